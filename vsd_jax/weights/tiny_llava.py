"""A random tiny LLaVA-1.5 checkpoint written here, offline and without torch: the `configs/llava.py:tiny` target
and the multimodal pipeline tests' (tests/test_llava_pipeline.py).

    make_tiny_llava("runs/llava_tiny/target")  ->  the directory (written once; reused when complete)
    load_target("tiny-llava-random")           ->  the same, written to default_dir() on first use (registry)

The directory is a llava-hf checkpoint like the real ones, so it loads through `weights.load_target` (the one
name table, read backwards by `convert.hf_tensors_from_params`):
  config.json        model_type "llava": a 2-of-3-layer CLIP ViT at 42 px with 14 px patches (9 image tokens per
                     image, feature layer -2), the two-layer GELU projector, an 8-layer LLaMA (hidden 32; the
                     EAGLE-3 draft reads layers 2, 4, 5); models/archs.py "tiny-llava-random" holds the same
  model.safetensors  random weights, scaled up (std 0.15, lm_head 0.6, norms 1 +- 0.1) so that the image features
                     and every layer move the logits by O(1) and next-token distributions are peaked: outputs differ
                     with and without an image, as with real weights, and greedy decoding has no near-ties;
                     the output rows of <unk>, <s>, <pad>, <image> are 0, so it does not generate them
  tokenizer + processor files: a word-level tokenizer whose words are those of the offline sample prompts
                     (vsd_jax/data/sample_images.json) and of LLaVA-1.5's conversation template (chat.py "llava"),
                     with <image>, and transformers' CLIP image processor (PIL backend) at 42 px: a LlavaProcessor.

Shapes are those of LLaVA-1.5 scaled down; nothing about it is trained, so its responses are random words.
"""

from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from vsd_jax.data.chat import VICUNA_TEMPLATE
from vsd_jax.data.images import sample_prompt_path
from vsd_jax.models.clip import ClipVisionConfig
from vsd_jax.models.llama import LlamaConfig
from vsd_jax.models.llava import LlavaConfig, LlavaForConditionalGeneration
from vsd_jax.weights.convert import hf_tensors_from_params, llava_hf_config_dict, llava_hf_name
# tokenizers and transformers are imported where the processor is built: transformers takes seconds to import.

IMAGE_SIZE, PATCH = 42, 14
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_DONE = "tiny_llava.done"  # written last: it marks a complete directory of this VERSION and seed
VERSION = 2
HEAD_SCALE = 0.6  # lm_head std: logits spread ~3, so next-token distributions are peaked (entropy ~2 nats)


def vocabulary() -> list:
  """The tokenizer's words: the specials, then every word / punctuation run of the sample prompts and the
  LLaVA-1.5 template (chat.VICUNA_TEMPLATE's system prompt and roles), sorted; padded to a multiple of 64."""
  with open(sample_prompt_path(), encoding="utf-8") as f:
    texts = [turn["value"] for rec in json.load(f) for turn in rec["conversations"]]
  texts += [re.sub(r"\{[{%].*?[%}]\}", " ", VICUNA_TEMPLATE), "USER: ASSISTANT:"]
  words = set()
  for text in texts:
    words.update(re.findall(r"\w+|[^\w\s]+", text.replace("<image>", " ")))
  words = SPECIAL + sorted(words - set(SPECIAL))
  return words + [f"<extra_{i}>" for i in range(-len(words) % 64)]


def make_processor(words=None):
  """LlavaProcessor: the word-level tokenizer (<image> its image token) + CLIP image processor (PIL) at 42 px."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast
  words = words or vocabulary()
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
  images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  # As llava-hf's processors: "default" strategy drops CLS, num_additional_image_tokens adds it back.
  return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=PATCH,
                        vision_feature_select_strategy="default", num_additional_image_tokens=1)


def tiny_llava_config(vocab_size: int):
  """models.llava.LlavaConfig of the tiny checkpoint (image token 4 = "<image>", eos 2 = "</s>")."""
  text = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4,
                     num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
  vision = ClipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=IMAGE_SIZE,
                            patch_size=PATCH)
  return LlavaConfig(text=text, vision=vision, image_token_id=SPECIAL.index("<image>"))


def random_params(cfg, seed: int = 0) -> dict:
  """Random float32 params of LlavaForConditionalGeneration(cfg) (numpy), scaled as the module docstring says."""
  params = random_like(LlavaForConditionalGeneration(cfg), seed)
  # The specials' output rows are 0 (logit 0 where the others spread O(1)): the model does not emit <image> or
  # <pad> (a real LLaVA never predicts its image token either), while </s> stays a possible end of turn.
  head = params["language_model"]["lm_head"]["kernel"]
  head *= HEAD_SCALE / 0.15
  head[:, [SPECIAL.index(t) for t in ("<unk>", "<s>", "<pad>", "<image>")]] = 0.0
  return params


def random_like(model, seed: int = 0) -> dict:
  """Random float32 numpy params of a target module: weights of std 0.15, RMS/layer-norm scales 1 +- 0.1 (every
  layer moves the logits by O(1)); the tiny random targets' (this file, weights/tiny_qwen3.py) shared scaling."""
  shapes = jax.eval_shape(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 4), jnp.int32))["params"]),
                          jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def one(path, x):
    is_norm_scale = jax.tree_util.keystr(path).endswith("['scale']")
    w = 1.0 + 0.1 * rng.standard_normal(x.shape) if is_norm_scale else 0.15 * rng.standard_normal(x.shape)
    return w.astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, shapes)


def default_dir(name: str = "tiny-llava-random") -> str:
  """Where the registry name `name` (a generated checkpoint) is written: $VSD_JAX_CACHE (default ~/.cache/vsd_jax)."""
  root = os.environ.get("VSD_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vsd_jax")
  return os.path.join(root, name)


def make_default() -> str:
  """The registry's "tiny-llava-random": written to default_dir() on first use."""
  return make_tiny_llava(default_dir())


def write_once(directory: str, marker: str, stamp: str, write) -> str:
  """write(directory) unless `directory` holds the file `marker` with text `stamp` (a complete earlier write of
  this version and seed); the marker is written last. Returns directory."""
  done = os.path.join(directory, marker)
  if os.path.isfile(done):
    with open(done) as f:
      if f.read() == stamp:
        return directory
  os.makedirs(directory, exist_ok=True)
  write(directory)
  with open(done, "w") as f:
    f.write(stamp)
  return directory


def make_tiny_llava(directory: str, seed: int = 0) -> str:
  """Write the tiny random LLaVA checkpoint to `directory` (unless a complete one is there); returns it."""
  def write(directory):
    processor = make_processor()
    cfg = tiny_llava_config(len(processor.tokenizer))
    tensors = hf_tensors_from_params(cfg, random_params(cfg, seed))
    save_file({llava_hf_name(k): v for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(dict(llava_hf_config_dict(cfg), pad_token_id=SPECIAL.index("<pad>")), f, indent=1)
    processor.save_pretrained(directory)
  return write_once(directory, _DONE, f"version {VERSION} seed {seed}\n", write)

"""A random tiny Qwen3 checkpoint written here, offline: the `configs/qwen3.py:tiny` target (CPU, minutes).

    make_tiny_qwen3("runs/qwen3_tiny/target")  ->  the directory (written once; reused when complete)
    load_target("tiny-qwen3-random")           ->  the same, written to tiny_llava.default_dir(...) on first use

The directory is an HF Qwen3 checkpoint like the real ones (config.json model_type "qwen3", model.safetensors,
tokenizer files), so it loads through `weights.load_target` and the one name table:
  config.json        Qwen3 scaled down: 8 layers (the EAGLE-3 draft reads 2, 4, 5: exportable), hidden 64, 4 query /
                     2 KV heads of head_dim 32 (4 * 32 != 64, as Qwen3's explicit head_dim), per-head q/k norms,
                     untied embeddings, 320 vocabulary rows
  model.safetensors  random weights, scaled as the tiny LLaVA's (tiny_llava.random_like), lm_head std 0.6 so that
                     next-token distributions are peaked; the output rows of the specials are 0 but <|im_end|>'s
  tokenizer files    byte-level BPE without merges (every UTF-8 byte a token, so any prompt encodes), the specials of
                     Qwen's ChatML (<|endoftext|> pad, <|im_start|>, <|im_end|> eos, <think>, </think>), and a ChatML
                     chat template with Qwen3's thinking switch (`enable_thinking`; false puts an empty think block
                     after the assistant header, as Qwen3's own template does)
Nothing about it is trained, so its responses are random bytes.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from vsd_jax.models.archs import arch
from vsd_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vsd_jax.weights.convert import hf_config_dict, hf_tensors_from_params
from vsd_jax.weights.tiny_llava import default_dir, random_like, write_once
# tokenizers and transformers are imported where the tokenizer is built: transformers takes seconds to import.

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VOCAB = 320  # 256 bytes + 5 specials, padded to a multiple of 64
HEAD_SCALE = 0.6
_DONE = "tiny_qwen3.done"
VERSION = 2
# Qwen's ChatML with Qwen3's switch: enable_thinking undefined or true lets the model think; false closes an empty
# think block in the generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def make_tokenizer():
  """PreTrainedTokenizerFast: byte-level BPE without merges, ids 0..255 the bytes, 256.. SPECIAL, ChatML template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(SPECIAL)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=CHAT_TEMPLATE)


def tiny_qwen3_config():
  """LlamaConfig of the tiny checkpoint (models/archs.py "tiny-qwen3-random" holds the same fields)."""
  return LlamaConfig(**arch("tiny-qwen3-random"))


def make_tiny_qwen3(directory: str, seed: int = 0) -> str:
  """Write the tiny random Qwen3 checkpoint to `directory` (unless a complete one is there); returns it."""
  def write(directory):
    tokenizer = make_tokenizer()
    cfg = tiny_qwen3_config()
    if len(tokenizer) > cfg.vocab_size:
      raise AssertionError(f"tokenizer of {len(tokenizer)} ids does not fit the {cfg.vocab_size} vocabulary rows")
    params = random_like(LlamaForCausalLM(cfg), seed)
    head = params["lm_head"]["kernel"]
    head *= HEAD_SCALE / 0.15
    head[:, 256:] = 0.0                                  # specials and padding rows: never emitted ...
    head[:, 256 + SPECIAL.index("<|im_end|>")] = HEAD_SCALE * np.random.default_rng(seed + 1).standard_normal(
        head.shape[0])                                   # ... but the end of turn
    save_file(hf_tensors_from_params(cfg, params), os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(dict(hf_config_dict(cfg), architectures=["Qwen3ForCausalLM"],
                     pad_token_id=256 + SPECIAL.index("<|endoftext|>")), f, indent=1)
    tokenizer.save_pretrained(directory)
  return write_once(directory, _DONE, f"version {VERSION} seed {seed}\n", write)


def make_default() -> str:
  """The registry's "tiny-qwen3-random": written under $VSD_JAX_CACHE (default ~/.cache/vsd_jax) on first use."""
  return make_tiny_qwen3(default_dir("tiny-qwen3-random"))

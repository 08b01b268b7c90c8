"""LLaVA-1.5 targets (llava-hf/llava-1.5-{7b,13b}-hf), and a random tiny LLaVA that runs offline on a CPU.

  python -m vsd_jax.train --config configs/llava.py:tiny               # tiny random LLaVA, offline images, CPU
  python -m vsd_jax.train --config configs/llava.py:tiny-adaptor       # the same with the draft's vision adaptor
  python -m vsd_jax.train --config configs/llava.py:7b-text            # stage 1: ShareGPT text
  python -m vsd_jax.train --config configs/llava.py:7b                 # stage 2: LLaVA-Instruct images, from stage 1
  python -m vsd_jax.train --config configs/llava.py:13b --dry_run      # compile for its v5p-64 slice, per-chip memory
  python -m vsd_jax.evaluate --config configs/llava.py:tiny --draft runs/llava_tiny/draft \
      --bench sample_images --data_dir <folder with sample_images/question.jsonl>

The paper-scale recipe (ViSpec's and VSD's): the draft first learns the language model on ShareGPT text
(`:7b-text` / `:13b-text`), then LLaVA-Instruct-150K conversations with their COCO images (`:7b` / `:13b`, which
start from the text stage's draft, draft.init_from; `--config.draft.init_from=` trains from scratch). Stage 2 reads
liuhaotian/LLaVA-Instruct-150K's llava_instruct_150k.json from the hub and the images from
<data.root>/coco/train2017 (COCO's train2017 folder; --config.data.sources.llava_instruct.image_folder=...).
Conversations are rendered in LLaVA-1.5's own format (data.chat_template "llava": Vicuna v1.1, "USER: <image>\\n...
ASSISTANT:"), each <image> expanded to the model's 576 image tokens; image positions are never predicted.

The draft's ViSpec-style vision adaptor (learned queries pool the image positions into one vector fused into every
text row; models/eagle3.py VisionAdaptor) is off by default: `--config.draft.vision_adaptor=True` on any of these
(`:tiny-adaptor` is `:tiny` with it, in its own workdir). A stage-1 draft without it starts stage 2 with it: the
adaptor starts fresh, its zero-initialised fusion leaving the stage-1 draft's outputs unchanged.

`:tiny` needs no network: the target is "tiny-llava-random" (weights/tiny_llava.py, written to
~/.cache/vsd_jax on first use), the prompts the offline sample set (vsd_jax/data/sample_images.json: images that
scikit-image and matplotlib ship); 8 prompts train, the other 3 are the held-out report's.
"""

import os

from vsd_jax.config_base import REPO_ROOT, SHAREGPT_HUB, base_config, eagle3_released_recipe, pod_mesh, tiny_training
from vsd_jax.models.archs import ARCHS, LLAVA_ARCHS

# The offline sample set (data.images.sample_prompt_path(); not imported here: configs load before JAX starts).
SAMPLE_PROMPTS = os.path.join(REPO_ROOT, "vsd_jax", "data", "sample_images.json")

# size -> (registry name (vsd_jax/weights/registry.py; architecture ARCHS + LLAVA_ARCHS[name]), slice, mesh
# (data, fsdp, tensor)): the meshes of configs/vicuna.py for the same language models (the vision tower and
# projector add 0.3B parameters). As there, the mesh is sized to the devices present by default; the slice's layout
# is its named preset (--config.mesh.preset=v5p-32; --dry_run compiles for it).
MODELS = {
    "7b": ("llava-1.5-7b", "v5p-32", (1, 8, 2)),
    "13b": ("llava-1.5-13b", "v5p-64", (1, 16, 2)),
}
STAGES = ("text", "images")


def get_config(arg="tiny"):
  arg = str(arg).lower()
  if arg in ("tiny", "tiny-adaptor"):
    return _tiny(adaptor=arg == "tiny-adaptor")
  size, _, stage = arg.partition("-")
  stage = stage or "images"
  if size not in MODELS or stage not in STAGES:
    raise ValueError(f"configs/llava.py:{arg}: unknown size or stage; use tiny, tiny-adaptor, or one of "
                     f"{sorted(MODELS)} with an optional -text (stage 1), e.g. configs/llava.py:7b-text then "
                     "configs/llava.py:7b")
  name, slice_name, (data, fsdp, tensor) = MODELS[size]
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", f"llava{size}" + ("-text" if stage == "text" else ""))
  c.model.name = name
  c.model.arch = dict(ARCHS[name])           # the language model of the hub's config.json (no download)
  c.model.llava = dict(LLAVA_ARCHS[name])    # its vision tower and projector
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 4096
  c.generate.batch_size = 1
  c.data.chat_template = "llava"
  if stage == "text":
    c.data.sources = dict(
        sharegpt=SHAREGPT_HUB)
  else:
    c.data.sources = dict(
        llava_instruct=dict(type="hub", name="liuhaotian/LLaVA-Instruct-150K", split="train", format="llava",
                            data_files="llava_instruct_150k.json", image_folder="coco/train2017", limit=-1))
    c.draft.init_from = os.path.join(REPO_ROOT, "runs", f"llava{size}-text", "draft")
  c.data.max_images = 1            # LLaVA-Instruct: one image per conversation
  c.data.draft_vocab_size = 32000
  c.data.max_length = 2048
  c.data.buckets = (1024, 2048)    # 576 image tokens + the conversation
  c.data.regen.max_new_tokens = 1024
  # EAGLE-3's released recipe, shorter: the image stage continues the text stage's draft.
  eagle3_released_recipe(c, warmup_steps=2000 if stage == "images" else 12000,
                         total_steps=40000 if stage == "images" else 400000)
  pod_mesh(c, slice_name, data, fsdp, tensor)
  return c


def _tiny(adaptor: bool = False):
  """The random tiny LLaVA on the offline sample images: the whole pipeline (responses regenerated with the
  images, EAGLE-3 training on multimodal batches, export, held-out report) in a few CPU minutes. adaptor: with the
  draft's vision adaptor (workdir runs/llava_tiny_adaptor; same data cache key, its own copy)."""
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "llava_tiny_adaptor" if adaptor else "llava_tiny")
  c.draft.vision_adaptor = adaptor
  c.model.name = "tiny-llava-random"
  c.model.max_positions = 512
  c.generate.max_new_tokens = 32
  c.data.sources = dict(sample=dict(type="llava", path=SAMPLE_PROMPTS, limit=8))
  c.data.chat_template = "llava"
  c.data.max_images = 2            # one sample prompt compares two images
  c.data.max_length = 128
  c.data.buckets = (128,)
  c.data.regen.max_new_tokens = 32
  c.data.regen.batch_size = 4
  c.data.draft_vocab_size = 128
  c.eval.heldout_source = dict(type="llava", path=SAMPLE_PROMPTS, start=8)
  tiny_training(c, batch_size=2)
  return c

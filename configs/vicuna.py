"""Vicuna v1.3 targets (lmsys/vicuna-{7b,13b}-v1.3 from the hub), EAGLE-3's paper-scale setting.

  python -m vsd_jax.train --config configs/vicuna.py               # 7B on a TPU v5p-32 slice (16 chips)
  python -m vsd_jax.train --config configs/vicuna.py:13b           # 13B on a TPU v5p-64 slice (32 chips)
  python -m vsd_jax.train --config configs/vicuna.py --dry_run     # compile here, print per-chip memory
  launch/tpu_pod.sh --name vsd --zone us-east5-a --type v5p-32 -- --config configs/vicuna.py
  python -m vsd_jax.generate --config configs/vicuna.py --prompts question.jsonl --output out.jsonl
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config
from vsd_jax.models.archs import ARCHS

# size -> registry name (vsd_jax/weights/registry.py); the architecture is ARCHS[name].
SIZES = {"7b": "vicuna-7b-v1.3", "13b": "vicuna-13b-v1.3"}


def get_config(size="7b"):
  size = str(size).lower()
  if size not in SIZES:
    raise ValueError(f"configs/vicuna.py:{size}: unknown size; use one of {sorted(SIZES)}, e.g. configs/vicuna.py:13b")
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", f"vicuna{size}")
  c.model.name = SIZES[size]
  c.model.arch = dict(ARCHS[c.model.name])  # the hub's config.json, so a dry run needs no download
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 2048
  c.generate.batch_size = 1
  # EAGLE-3's training prompts: ShareGPT + UltraChat-200K from the hub (local files: see config_base.py).
  c.data.sources = dict(
      sharegpt=dict(type="hub", name="Aeala/ShareGPT_Vicuna_unfiltered", split="train", format="sharegpt",
                    data_files="ShareGPT_V4.3_unfiltered_cleaned_split.json", limit=-1),
      ultrachat=dict(type="hub", name="HuggingFaceH4/ultrachat_200k", split="train_sft", format="messages",
                     limit=-1))
  c.data.draft_vocab_size = 32000
  c.data.chat_template = "vicuna"  # the vicuna-v1.3 tokenizer ships no chat template
  c.data.max_length = 2048
  c.data.buckets = (512, 1024, 2048)
  # EAGLE-3's released recipe (eagle/traineagle3/ds_config.json): AdamW b=(0.9, 0.95), no weight decay,
  # clip 0.5, peak lr 5e-5 after 12000 warmup steps, 800000 steps, 7-step TTT; 1 sequence per GPU x 2
  # accumulation x 8 GPUs = 16 sequences per update. (Their decay is linear, ours cosine.)
  c.train.batch_size = 16
  c.train.lr = 5e-5
  c.train.warmup_steps = 12000
  c.train.total_steps = 800000
  c.train.b1, c.train.b2, c.train.weight_decay, c.train.grad_clip = 0.9, 0.95, 0.0, 0.5
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.draft.ttt_steps = 7
  # 7B: v5p-32 (16 chips), FSDP 8 x tensor 2; 13B: v5p-64 (32 chips), FSDP 16 x tensor 2. Why these meshes
  # (per-chip memory of each choice): docs/RESULTS.md section 5.
  c.mesh.slice = "v5p-32" if size == "7b" else "v5p-64"
  c.mesh.device_memory_gib = 0.0  # 0 = the slice's chip (v5p: 95 GiB); see vsd_jax/dry_run.py
  c.mesh.data = 1
  c.mesh.fsdp = 8 if size == "7b" else 16
  c.mesh.tensor = 2
  return c

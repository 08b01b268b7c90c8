"""Llama-3 targets: Llama-3.1-8B-Instruct and Llama-3.3-70B-Instruct (gated on the hub).

  python -m vsd_jax.train --config configs/llama3.py                    # 8B on a TPU v5p-32 slice (16 chips)
  python -m vsd_jax.train --config configs/llama3.py:70b                # 70B on a TPU v5p-64 slice (32 chips)
  python -m vsd_jax.train --config configs/llama3.py:70b --dry_run      # compile here, print per-chip memory
  launch/tpu_pod.sh --name vsd --zone us-east5-a --type v5p-64 -- --config configs/llama3.py:70b
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config
from vsd_jax.models.archs import ARCHS

# size -> (registry name (vsd_jax/weights/registry.py; the architecture is ARCHS[name]), slice, mesh (data,
# fsdp, tensor)). Why these meshes (per-chip memory of each choice): docs/RESULTS.md section 5.
MODELS = {
    "8b": ("llama-3.1-8b-instruct", "v5p-32", (1, 8, 2)),
    "70b": ("llama-3.3-70b-instruct", "v5p-64", (1, 8, 4)),
}


def get_config(size="8b"):
  size = str(size).lower()
  if size not in MODELS:
    raise ValueError(f"configs/llama3.py:{size}: unknown size; use one of {sorted(MODELS)}, e.g. configs/llama3.py:70b")
  name, slice_name, (data, fsdp, tensor) = MODELS[size]
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", f"llama3_{size}")
  c.model.name = name
  c.model.arch = dict(ARCHS[name])  # the hub's config.json, so a dry run needs no download
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 4096
  c.generate.batch_size = 1
  # EAGLE-3's training prompts: ShareGPT + UltraChat-200K from the hub (local files: see config_base.py).
  c.data.sources = dict(
      sharegpt=dict(type="hub", name="Aeala/ShareGPT_Vicuna_unfiltered", split="train", format="sharegpt",
                    data_files="ShareGPT_V4.3_unfiltered_cleaned_split.json", limit=-1),
      ultrachat=dict(type="hub", name="HuggingFaceH4/ultrachat_200k", split="train_sft", format="messages",
                     limit=-1))
  c.data.draft_vocab_size = 32000
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
  c.mesh.slice = slice_name        # v5p chips: 95 GiB HBM each
  c.mesh.device_memory_gib = 0.0   # 0 = the slice's chip; see vsd_jax/dry_run.py
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c

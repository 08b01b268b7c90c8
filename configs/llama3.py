"""Llama-3 targets: Llama-3.1-8B-Instruct and Llama-3.3-70B-Instruct (gated on the hub).

  python -m vsd_jax.train --config configs/llama3.py                    # 8B on the devices present (FSDP over all)
  python -m vsd_jax.train --config configs/llama3.py:70b                # 70B
  python -m vsd_jax.train --config configs/llama3.py:70b --dry_run      # compile for the v5p-64 slice, per-chip memory
  launch/tpu_pod.sh --name vsd --zone us-east5-a --type v5p-64 -- --config configs/llama3.py:70b \
      --config.mesh.preset=v5p-64

The mesh is sized to the devices present (mesh.fsdp = -1); the pod layout of MODELS below is the named preset of its
slice, used with --config.mesh.preset=<slice> and by --dry_run. The chosen mesh is logged.
"""

import os

from vsd_jax.config_base import REPO_ROOT, SHAREGPT_HUB, base_config, eagle3_released_recipe, pod_mesh
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
      sharegpt=SHAREGPT_HUB,
      ultrachat=dict(type="hub", name="HuggingFaceH4/ultrachat_200k", split="train_sft", format="messages",
                     limit=-1))
  c.data.draft_vocab_size = 32000
  c.data.max_length = 2048
  c.data.buckets = (512, 1024, 2048)
  eagle3_released_recipe(c)
  pod_mesh(c, slice_name, data, fsdp, tensor)
  return c

"""Llama-3 targets: Llama-3.1-8B-Instruct and Llama-3.3-70B-Instruct (gated on the hub).

  python -m vsd_jax.train --config configs/llama3.py                    # 8B on the devices present (FSDP over all)
  python -m vsd_jax.train --config configs/llama3.py:70b                # 70B
  python -m vsd_jax.train --config configs/llama3.py:70b --dry_run      # compile for the v5p-64 slice, per-chip memory
  launch/tpu_pod.sh --name vsd --zone us-east5-a --type v5p-64 -- --config configs/llama3.py:70b \
      --config.mesh.preset=v5p-64

The mesh is sized to the devices present (mesh.fsdp = -1); the pod layout of MODELS below is the named preset of its
slice, used with --config.mesh.preset=<slice> and by --dry_run. The chosen mesh is logged.
"""

from vsd_jax.config_base import hub_target_config

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
  # EAGLE-3's training prompts (ShareGPT + UltraChat-200K from the hub) and released recipe.
  return hub_target_config(name, f"llama3_{size}", slice_name, data, fsdp, tensor)

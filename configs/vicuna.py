"""Vicuna v1.3 targets (lmsys/vicuna-{7b,13b}-v1.3 from the hub), EAGLE-3's paper-scale setting.

  python -m vsd_jax.train --config configs/vicuna.py               # 7B on the devices present (FSDP over all)
  python -m vsd_jax.train --config configs/vicuna.py:13b           # 13B
  python -m vsd_jax.train --config configs/vicuna.py --dry_run     # compile for the v5p-32 slice, per-chip memory
  launch/tpu_pod.sh --name vsd --zone us-east5-a --type v5p-32 -- --config configs/vicuna.py --config.mesh.preset=v5p-32
  python -m vsd_jax.generate --config configs/vicuna.py --prompts question.jsonl --output out.jsonl

The mesh is sized to the devices present (mesh.fsdp = -1: one GPU, an 8-GPU node, any slice); the pod layout of the
recipe is the named preset of its slice (7B: v5p-32, fsdp 8 x tensor 2; 13B: v5p-64, fsdp 16 x tensor 2), used with
--config.mesh.preset=<slice> and by --dry_run. The chosen mesh is logged.
"""

from vsd_jax.config_base import hub_target_config

# size -> registry name (vsd_jax/weights/registry.py); the architecture is ARCHS[name].
SIZES = {"7b": "vicuna-7b-v1.3", "13b": "vicuna-13b-v1.3"}


def get_config(size="7b"):
  size = str(size).lower()
  if size not in SIZES:
    raise ValueError(f"configs/vicuna.py:{size}: unknown size; use one of {sorted(SIZES)}, e.g. configs/vicuna.py:13b")
  # EAGLE-3's training prompts (ShareGPT + UltraChat-200K from the hub) and released recipe. 7B: v5p-32 (16 chips),
  # FSDP 8 x tensor 2; 13B: v5p-64 (32 chips), FSDP 16 x tensor 2. Why these meshes (per-chip memory of each
  # choice): docs/RESULTS.md section 5.
  c = hub_target_config(SIZES[size], f"vicuna{size}", "v5p-32" if size == "7b" else "v5p-64", data=1,
                        fsdp=8 if size == "7b" else 16, tensor=2)
  c.model.max_positions = 2048
  c.data.chat_template = "vicuna"  # the vicuna-v1.3 tokenizer ships no chat template
  return c

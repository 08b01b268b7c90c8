"""Vicuna-7B v1.3 target (lmsys/vicuna-7b-v1.3 from the hub), EAGLE-3's paper-scale setting.

  python -m vsd_jax.train --config configs/vicuna.py
  python -m vsd_jax.generate --config configs/vicuna.py --prompts question.jsonl --output out.jsonl
Use --config.model.name=vicuna-13b-v1.3 for the 13B target, or a local HF directory.
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config


def get_config():
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "vicuna7b")
  c.model.name = "vicuna-7b-v1.3"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 2048
  c.generate.batch_size = 1
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c

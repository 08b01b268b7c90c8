"""Llama-3.1-8B-Instruct target (meta-llama/Llama-3.1-8B-Instruct, gated on the hub).

  python -m vsd_jax.train --config configs/llama3.py
Use --config.model.name=llama-3.3-70b-instruct for the 70B target (needs a pod slice).
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config


def get_config():
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "llama3_8b")
  c.model.name = "llama-3.1-8b-instruct"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 4096
  c.generate.batch_size = 1
  return c

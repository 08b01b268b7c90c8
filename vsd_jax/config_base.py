"""Defaults shared by every config in configs/: each get_config() starts from `base_config()`."""

import os

import ml_collections

# The checkout's root (configs/, runs/ live there); the installed package is an editable install.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Local prompt files (the team's shared/data); override with VSD_DATA_DIR or --config.data.root.
DEFAULT_DATA_ROOT = os.environ.get("VSD_DATA_DIR", os.path.join(REPO_ROOT, "..", "shared", "data"))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = os.path.join(REPO_ROOT, "runs", "default")

  # Target model: registry name, GGUF path, HF directory or hub id.
  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"
  c.model.dtype = "float32"          # compute dtype
  c.model.param_dtype = "float32"    # storage dtype of target params
  c.model.max_positions = 2048       # cache/positions bound for generation and training sequences

  # Vanilla / speculative generation defaults (CLI flags override these).
  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 128
  c.generate.temperature = 0.0
  c.generate.top_p = 1.0
  c.generate.batch_size = 1
  c.generate.system_prompt = ""      # "" keeps the tokenizer's default chat template behaviour

  # Data: prompt sources and the regenerated-response cache.
  c.data = ml_collections.ConfigDict()
  c.data.root = DEFAULT_DATA_ROOT

  # Parallelism: mesh axis sizes (-1 = all remaining devices) and logical axis rules.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c

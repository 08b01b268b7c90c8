"""What identifies a target's weights in cache keys (responses, features, autotune tables).

Kept apart from `weights.registry` (which loads models and imports the data layer's image processor) so that the
data and decoding layers can name a target's weights without importing the loaders.
"""
from __future__ import annotations

import os


def model_id(target) -> str:
  """What identifies the target's outputs in cache keys: its weights (file or folder name and byte sizes, not
  where they are installed, so a cache made on another machine is found) and dtypes."""
  return f"{weights_identity(target.source)}|{target.config.dtype}|{target.config.param_dtype}"


def weights_identity(source: str) -> str:
  """A GGUF file -> "name:bytes"; an HF folder -> "folder:" + its weight files' names and sizes; else source."""
  if os.path.isfile(source):
    return f"{os.path.basename(source)}:{os.path.getsize(source)}"
  if os.path.isdir(source):
    files = sorted(f for f in os.listdir(source) if f.endswith((".safetensors", ".bin", ".gguf", "config.json")))
    return os.path.basename(os.path.normpath(source)) + ":" + ",".join(
        f"{f}:{os.path.getsize(os.path.join(source, f))}" for f in files)
  return source

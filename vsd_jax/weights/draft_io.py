"""Save and load a trained draft for decoding: params + Eagle3Config + draft vocab + the target it fits."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.serialization
import jax
import numpy as np

from vsd_jax.models.eagle3 import Eagle3Config


class DraftMismatchError(ValueError):
  pass


def save_draft(directory: str, cfg: Eagle3Config, params, d2t, t2d, target_cfg) -> str:
  """Write <directory>/{draft.msgpack, draft_config.json, vocab.npz}. Returns the directory."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "draft.msgpack"), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(params))))
  meta = dict(draft=dataclasses.asdict(cfg), target=dict(
      hidden_size=target_cfg.hidden_size, num_layers=target_cfg.num_layers, vocab_size=target_cfg.vocab_size))
  with open(os.path.join(directory, "draft_config.json"), "w") as f:
    json.dump(meta, f, indent=1)
  np.savez(os.path.join(directory, "vocab.npz"), d2t=np.asarray(d2t), t2d=np.asarray(t2d))
  return directory


def load_draft(directory: str, target_cfg=None):
  """-> (Eagle3Config, params, d2t int32 [N], t2d bool [V]). Checks the draft fits `target_cfg`."""
  cfg_path = os.path.join(directory, "draft_config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"no trained draft at {directory!r} (missing draft_config.json); pass the "
                            "directory written by `python -m vsd_jax.train` (<workdir>/draft).")
  with open(cfg_path) as f:
    meta = json.load(f)
  d = meta["draft"]
  d["target_layers"] = tuple(d["target_layers"])
  cfg = Eagle3Config(**d)
  if target_cfg is not None:
    want = dict(hidden_size=target_cfg.hidden_size, num_layers=target_cfg.num_layers,
                vocab_size=target_cfg.vocab_size)
    bad = {k: (meta["target"][k], v) for k, v in want.items() if meta["target"][k] != v}
    if bad:
      detail = ", ".join(f"{k}: draft {a} vs target {b}" for k, (a, b) in bad.items())
      raise DraftMismatchError(f"draft {directory!r} was trained for another target ({detail}); train a draft "
                               "for this target or load the target it was trained for.")
  with open(os.path.join(directory, "draft.msgpack"), "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  vocab = np.load(os.path.join(directory, "vocab.npz"))
  return cfg, jax.tree.map(jax.numpy.asarray, params), vocab["d2t"].astype(np.int32), vocab["t2d"].astype(bool)

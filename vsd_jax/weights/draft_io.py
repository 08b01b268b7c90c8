"""Save and load a trained draft for decoding: params + Eagle3Config + draft vocab + the target it fits.

Saved atomically with a manifest (each file's size and sha256) that load_draft checks: a truncated or corrupted
draft is a DraftCorruptError naming the file and how to write it again. Drafts saved before the manifest load
unchecked, as they did."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Optional

import flax.serialization
import jax
import numpy as np

from vsd_jax.errors import InputNotFoundError, UserError
from vsd_jax.models.eagle3 import Eagle3Config


class DraftMismatchError(UserError):
  """A draft trained for another target than the one it is loaded with."""


# The files of a draft directory; MANIFEST records each one's size and sha256 (drafts from before it have none).
DRAFT_FILES = ("draft.msgpack", "draft_config.json", "vocab.npz")
MANIFEST = "manifest.json"
REEXPORT = ("re-export it: rerun `python -m vsd_jax.train` with the same config (it resumes from its last checkpoint "
            "and writes <workdir>/draft again) or `python -m vsd_jax.convert_draft --to vsd_jax --overwrite`")


class DraftCorruptError(UserError):
  """A draft file that is truncated, corrupted or missing; the message names it and how to write it again."""


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _write_durably(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def save_draft(directory: str, cfg: Eagle3Config, params, d2t, t2d, target_cfg) -> str:
  """Write <directory>/{draft.msgpack, draft_config.json, vocab.npz, manifest.json}. Returns the directory.

  Atomic per file and checked as a whole: every file is written in full to a temporary name first, then the
  manifest (each file's size and sha256) is renamed into place, then each file. An interrupted save leaves
  either the old draft untouched (stopped before the renames) or files that disagree with the manifest, which
  load_draft reports naming the file; never a draft that loads with mixed or truncated weights. Other files in
  the directory are left alone."""
  os.makedirs(directory, exist_ok=True)
  meta = dict(draft=dataclasses.asdict(cfg), target=dict(
      hidden_size=target_cfg.hidden_size, num_layers=target_cfg.num_layers, vocab_size=target_cfg.vocab_size))
  vocab = io.BytesIO()
  np.savez(vocab, d2t=np.asarray(d2t), t2d=np.asarray(t2d))
  contents = {
      "draft.msgpack": flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(params))),
      "draft_config.json": json.dumps(meta, indent=1).encode(),
      "vocab.npz": vocab.getvalue()}
  manifest = dict(format=1, files={n: dict(bytes=len(b), sha256=_sha256(b)) for n, b in contents.items()})
  contents = {MANIFEST: json.dumps(manifest, indent=1).encode(), **contents}  # the manifest goes in first
  tmp = {name: os.path.join(directory, f".{name}.tmp-{os.getpid()}") for name in contents}
  try:
    for name, data in contents.items():
      _write_durably(tmp[name], data)
    for name in contents:
      os.replace(tmp[name], os.path.join(directory, name))
  finally:
    for path in tmp.values():
      if os.path.exists(path):
        os.remove(path)
  return directory


def _read_checked(directory: str, name: str, manifest: Optional[dict]) -> bytes:
  """The bytes of a draft file, checked against the manifest's size and sha256 when there is one."""
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise DraftCorruptError(f"draft file {path!r} is missing; {REEXPORT}.")
  with open(path, "rb") as f:
    data = f.read()
  want = None if manifest is None else manifest["files"].get(name)
  if want is not None and (len(data) != want["bytes"] or _sha256(data) != want["sha256"]):
    what = (f"truncated: {len(data)} of {want['bytes']} bytes" if len(data) < want["bytes"] else
            f"{len(data)} bytes, sha256 differs from the manifest's")
    raise DraftCorruptError(f"draft file {path!r} is corrupted ({what}); {REEXPORT}.")
  return data


def load_draft(directory: str, target_cfg=None):
  """-> (Eagle3Config, params, d2t int32 [N], t2d bool [V]). Checks the draft fits `target_cfg`, and each file
  against the draft's manifest (a draft saved before manifests existed loads unchecked)."""
  cfg_path = os.path.join(directory, "draft_config.json")
  if not os.path.isfile(cfg_path):
    raise InputNotFoundError(f"no trained draft at {directory!r} (missing draft_config.json); pass the "
                             "directory written by `python -m vsd_jax.train` (<workdir>/draft).")
  manifest = None
  if os.path.isfile(os.path.join(directory, MANIFEST)):
    try:
      manifest = json.loads(_read_checked(directory, MANIFEST, None))
    except ValueError as e:
      manifest = e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
      raise DraftCorruptError(f"draft manifest {os.path.join(directory, MANIFEST)!r} is unreadable; {REEXPORT}.")
  raw = {name: _read_checked(directory, name, manifest) for name in DRAFT_FILES}
  try:
    meta = json.loads(raw["draft_config.json"])
    d = meta["draft"]
    d["target_layers"] = tuple(d["target_layers"])
    cfg = Eagle3Config(**d)
  except (ValueError, KeyError, TypeError) as e:
    raise DraftCorruptError(f"draft file {cfg_path!r} is not a draft configuration ({type(e).__name__}: {e}); "
                            f"{REEXPORT}.") from e
  if target_cfg is not None:
    want = dict(hidden_size=target_cfg.hidden_size, num_layers=target_cfg.num_layers,
                vocab_size=target_cfg.vocab_size)
    bad = {k: (meta["target"][k], v) for k, v in want.items() if meta["target"][k] != v}
    if bad:
      detail = ", ".join(f"{k}: draft {a} vs target {b}" for k, (a, b) in bad.items())
      raise DraftMismatchError(f"draft {directory!r} was trained for another target ({detail}); train a draft "
                               "for this target or load the target it was trained for.")
  try:
    params = flax.serialization.msgpack_restore(raw["draft.msgpack"])
  except Exception as e:  # msgpack's own errors (ExtraData, "Unpack failed: incomplete input", ...)
    raise DraftCorruptError(f"draft file {os.path.join(directory, 'draft.msgpack')!r} is unreadable "
                            f"({type(e).__name__}: {e}); {REEXPORT}.") from e
  try:
    vocab = np.load(io.BytesIO(raw["vocab.npz"]))
    d2t, t2d = vocab["d2t"].astype(np.int32), vocab["t2d"].astype(bool)
  except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, ...
    raise DraftCorruptError(f"draft file {os.path.join(directory, 'vocab.npz')!r} is unreadable "
                            f"({type(e).__name__}: {e}); {REEXPORT}.") from e
  return cfg, jax.tree.map(jax.numpy.asarray, params), d2t, t2d

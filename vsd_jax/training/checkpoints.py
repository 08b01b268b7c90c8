"""Checkpoints of the train state with orbax: save every N steps, keep K, restore into the sharded state.

Layout: <workdir>/checkpoints/<step>/{state, meta}. `state` is the TrainState (orbax array format,
restored straight into the shardings of the current mesh, which may differ from the saving one);
`meta` is JSON: the step, the data position, the run's config and a checksum of every state array.

A checkpoint whose files cannot be read, or whose arrays do not match their checksums, raises
CorruptCheckpointError naming its directory and step. With `fallback=True` (config
train.resume_fallback) the newest readable checkpoint is used instead and the corrupt ones are moved
to <workdir>/checkpoints_corrupt/ (kept for inspection, out of the way of new saves).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vsd_jax.errors import UserError
from vsd_jax.resolved import as_resolved

FORMAT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
  """A checkpoint directory that cannot be resumed from as it is; the message names it and the fix."""


class CorruptCheckpointError(CheckpointError):
  def __init__(self, directory: str, step: int, reason: str, previous: Optional[int] = None):
    self.directory, self.step, self.previous = directory, step, previous
    fix = (f"set train.resume_fallback=True (--config.train.resume_fallback=True) to resume from step "
           f"{previous}, or delete {directory}" if previous is not None else
           f"no older checkpoint is readable; delete {directory} (or its parent) to start afresh")
    super().__init__(f"checkpoint {directory} (step {step}) is corrupt: {reason}. Fix: {fix}.")


class CheckpointMismatchError(CheckpointError):
  """The checkpoint is readable but holds a different model/optimiser than the one being trained."""


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _leaf_bits_sum(x: jax.Array) -> jax.Array:
  """Sum of the array's bit patterns mod 2**32 (exact under any sharding): uint32 []."""
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize in (1, 2):
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  else:  # 8-byte types split into two uint32 words
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.sum(u, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree_util.tree_map(_leaf_bits_sum, tree))


def state_checksums(state: Any) -> dict:
  """{leaf path: uint32 checksum} of a pytree of arrays."""
  sums = jax.device_get(_checksums_jit(state))
  return {_path_str(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


class Checkpoints:
  """orbax CheckpointManager for one run directory. Saves are asynchronous when `async_save`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, config: Any = None):
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = self.directory + "_corrupt"
    self._config = None
    if config is not None:
      self._config = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
          else dict(config)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  @classmethod
  def from_config(cls, config) -> "Checkpoints":
    """<workdir>/checkpoints with config.train's keep_checkpoints / async_checkpoint; `config` (a ConfigDict) is
    stored in each checkpoint's meta."""
    settings = as_resolved(config)
    return cls(os.path.join(settings.workdir, "checkpoints"), keep=settings.train.keep_checkpoints,
               async_save=settings.train.async_checkpoint, config=config)

  def all_steps(self) -> list:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, extra: Optional[dict] = None) -> None:
    """Save `state` (a pytree of global arrays) as checkpoint `step`; returns once arrays are on host."""
    meta = {"format": FORMAT_VERSION, "step": int(step), "data_position": int(step), "time": time.time(),
            "checksums": state_checksums(state), "config": self._config, "extra": extra or {}}
    self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

  def _check_structure(self, step: int, abstract_state: Any) -> None:
    try:
      tree = self._mngr.item_metadata(step)["state"]
      tree = getattr(tree, "tree", tree)
    except Exception as e:  # unreadable metadata: corrupt, handled by the caller
      raise CorruptCheckpointError(self.step_dir(step), step, f"cannot read its metadata ({e!r:.300})",
                                   self._previous(step)) from e
    saved = {_path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]
             if hasattr(m, "shape")}
    if not saved:
      raise CorruptCheckpointError(self.step_dir(step), step, "its state metadata lists no arrays",
                                   self._previous(step))
    wanted = {_path_str(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing = sorted(set(wanted) - set(saved))
    differ = sorted(k for k in set(wanted) & set(saved) if wanted[k] != saved[k])
    if missing or differ:
      detail = "; ".join([f"{k}: saved {saved[k]}, expected {wanted[k]}" for k in differ[:5]] +
                         [f"{k}: not in the checkpoint" for k in missing[:5]])
      raise CheckpointMismatchError(
          f"checkpoint {self.step_dir(step)} (step {step}) holds a different train state than this run's "
          f"model/optimiser ({detail}). Fix: use a new workdir, or the config the checkpoint was saved "
          f"with (in its meta/ item), or set train.resume=False to start afresh.")

  def _previous(self, step: int) -> Optional[int]:
    older = [s for s in self.all_steps() if s < step]
    return older[-1] if older else None

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple:
    """(state, meta) of checkpoint `step` (default: latest), placed by abstract_state's shardings.

    abstract_state: pytree of jax.ShapeDtypeStruct with .sharding (see state.state_shardings).
    Raises CorruptCheckpointError or CheckpointMismatchError.
    """
    self._mngr.wait_until_finished()
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    self._check_structure(step, abstract_state)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      state, meta = out["state"], out["meta"]
    except Exception as e:
      raise CorruptCheckpointError(self.step_dir(step), step, f"reading it failed with {e!r:.400}",
                                   self._previous(step)) from e
    if not isinstance(meta, dict) or meta.get("step") != step or "checksums" not in meta:
      raise CorruptCheckpointError(self.step_dir(step), step, "its meta item is missing or malformed",
                                   self._previous(step))
    sums = state_checksums(state)
    bad = sorted(k for k in sums if meta["checksums"].get(k) != sums[k])
    if bad:
      raise CorruptCheckpointError(self.step_dir(step), step,
                                   f"arrays differ from their saved checksums: {', '.join(bad[:5])}",
                                   self._previous(step))
    return state, meta

  def restore_latest(self, abstract_state: Any, fallback: bool = False) -> Optional[tuple]:
    """(state, meta) of the newest checkpoint, None when there is none.

    A corrupt newest checkpoint raises CorruptCheckpointError, or with `fallback` is moved to
    <directory>_corrupt/ and the next older one is tried.
    """
    while True:
      step = self.latest_step()
      if step is None:
        return None
      try:
        return self.restore(abstract_state, step)
      except CorruptCheckpointError as e:
        if not fallback:
          raise
        logging.warning("%s Falling back to an older checkpoint (train.resume_fallback=True).", e)
        self._quarantine(step)

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      dest = os.path.join(self.corrupt_directory, f"{step}.{int(time.time())}")
      shutil.move(self.step_dir(step), dest)
      logging.warning("moved corrupt checkpoint %s to %s", self.step_dir(step), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vsd_quarantine_{step}")
    self._mngr.reload()

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice (SIGTERM via jax.distributed) reached `step`."""
    return self._mngr.reached_preemption(step)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

"""Training methods by name (config.method): each builds the pieces the generic trainer runs."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

METHODS = ("eagle3", "vsd")


@dataclasses.dataclass
class Method:
  draft: Any                   # the draft module (Eagle3Draft)
  init_params: Callable        # rng -> boxed trainable params
  loss_fn: Callable            # (params, frozen, batch, rng[, method_state]) -> (loss, metrics[, new state])
  frozen: Any                  # target weights, vocab maps: read by the loss, never trained
  method_state: Optional[Any] = None  # carried between steps (VSD's per-depth acceptance EMA); None = none


def build_method(config, target, vocab) -> Method:
  """config.method -> Method for `target` and the draft vocabulary `vocab` (data.draft_vocab); with
  config.draft.init_from, the draft starts from that trained draft instead of a random init."""
  name = str(config.method)
  if name == "eagle3":
    from vsd_jax.training.eagle3_method import build_eagle3
    method = Method(*build_eagle3(config, target, vocab))
  elif name == "vsd":
    from vsd_jax.training.vsd_method import build_vsd
    method = build_vsd(config, target, vocab)
  else:
    raise ValueError(f"config.method={name!r} is not a training method; use one of {METHODS}")
  if config.draft.get("init_from", ""):
    method.init_params = _init_from(str(config.draft.init_from), method.init_params, target, vocab)
  return method


def _init_from(directory: str, init_params: Callable, target, vocab) -> Callable:
  """init_params that returns the trained draft in `directory` (same boxes/logical axes as a fresh init)."""
  import flax.linen as nn
  import jax
  import numpy as np

  from vsd_jax.weights.draft_io import DraftMismatchError, load_draft

  _, loaded, d2t, _ = load_draft(directory, target.config)
  if d2t.shape != np.shape(vocab.d2t) or not np.array_equal(d2t, np.asarray(vocab.d2t)):
    raise DraftMismatchError(
        f"draft.init_from={directory!r} was trained with another draft vocabulary ({d2t.shape[0]} tokens) than "
        f"this run's ({np.shape(vocab.d2t)[0]}); use the same data and data.draft_vocab_size, or train from scratch")

  def init(rng):
    fresh = init_params(rng)
    want = jax.tree_util.tree_structure(nn.unbox(fresh))
    if jax.tree_util.tree_structure(loaded) != want:
      raise DraftMismatchError(f"draft.init_from={directory!r} holds parameters of another draft architecture")
    leaves = iter(jax.tree_util.tree_leaves(loaded))
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return jax.tree_util.tree_map(
        lambda x: x.replace_boxed(next(leaves)) if is_box(x) else next(leaves), fresh, is_leaf=is_box)

  return init

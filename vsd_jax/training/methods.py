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
  """config.method -> Method for `target` and the draft vocabulary `vocab` (data.draft_vocab)."""
  name = str(config.method)
  if name == "eagle3":
    from vsd_jax.training.eagle3_method import build_eagle3
    return Method(*build_eagle3(config, target, vocab))
  if name == "vsd":
    from vsd_jax.training.vsd_method import build_vsd
    return build_vsd(config, target, vocab)
  raise ValueError(f"config.method={name!r} is not a training method; use one of {METHODS}")

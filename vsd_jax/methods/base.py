"""What every training method shares: the `Method` record the generic trainer runs."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


@dataclasses.dataclass
class Method:
  """What `vsd_jax.methods.<name>.build(config, target, vocab)` returns; see `vsd_jax.training.trainer`."""
  draft: Any                   # the draft module (Eagle3Draft)
  init_params: Callable        # rng -> boxed trainable params
  loss_fn: Callable            # (params, frozen, batch, rng[, method_state]) -> (loss, metrics[, new state])
  frozen: Any                  # target weights, vocab maps: read by the loss, never trained
  method_state: Optional[Any] = None  # carried between steps (VSD's per-depth acceptance EMA); None = none
  # (params, frozen, batch, rng) -> {name: scalar}: what the held-out report measures (`methods.build_method` sets it)
  heldout_metrics_fn: Optional[Callable] = None

"""Train state and optimiser: AdamW, linear warmup + cosine decay, global-norm clipping (Resolved.train).

The state holds only what training changes (the draft's parameters and its optimiser state); the frozen
target weights, embedding and vocabulary maps are passed to the train step separately.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from vsd_jax import parallel
from vsd_jax.resolved import TrainSettings

# Leaves with these names are not weight-decayed (flax names norm scales and biases so).
NO_DECAY_NAMES = ("scale", "bias")


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 []: optimiser updates applied so far
  params: Any           # trainable parameters (unboxed pytree)
  opt_state: Any        # optax state of `params`
  rng: jax.Array        # uint32 [2]: base key; step s uses fold_in(rng, s)
  # What a method carries from step to step besides parameters (VSD: per-depth acceptance EMA); {} = none.
  method_state: Any = flax.struct.field(default_factory=dict)


def lr_schedule(train: TrainSettings) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then cosine decay to lr * end_lr_ratio at total_steps
  (train: Resolved.train, its values checked at resolve)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps, decay_steps=train.total_steps,
      end_value=train.lr * train.end_lr_ratio)


def _decay_mask(params):
  def keep(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not (names and names[-1] in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train: TrainSettings) -> tuple:
  """(optax transformation, lr schedule) from Resolved.train."""
  schedule = lr_schedule(train)
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts), schedule


def _state_fn(init_params: Callable, tx: optax.GradientTransformation, unbox: bool, method_state: Any = None):
  method_state = {} if method_state is None else method_state

  def create(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = init_params(params_rng)
    if unbox:
      params = nn.unbox(params)
    # With boxed params the optimiser moments inherit the boxes, hence the parameters' logical axes.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
                      method_state=jax.tree_util.tree_map(jnp.asarray, method_state))
  return create


def state_shardings(init_params: Callable, tx: optax.GradientTransformation, rng: jax.Array, mesh,
                    rules, method_state: Any = None) -> tuple:
  """(abstract TrainState of ShapeDtypeStructs carrying their shardings, TrainState of NamedShardings).

  `init_params(rng) -> params` may return Flax-boxed leaves (logical axis names); those are sharded by
  `rules`, the rest replicated. The abstract state is what a checkpoint restores into.
  """
  boxed = jax.eval_shape(_state_fn(init_params, tx, unbox=False, method_state=method_state), rng)
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(init_params: Callable, tx: optax.GradientTransformation, rng: jax.Array,
                       shardings: TrainState, method_state: Any = None) -> TrainState:
  """A fresh state, initialised directly into its shardings (no full copy on one device)."""
  return jax.jit(_state_fn(init_params, tx, unbox=True, method_state=method_state), out_shardings=shardings)(rng)

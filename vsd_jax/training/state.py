"""Train state and optimiser: AdamW, linear warmup + cosine decay, global-norm clipping (config.train).

The state holds only what training changes (the draft's parameters and its optimiser state); the frozen
target weights, embedding and vocabulary maps are passed to the train step separately.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from vsd_jax import parallel
from vsd_jax.errors import ConfigError

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


def check_train_settings(train_cfg) -> None:
  """config.train's numbers in range, or a ConfigError naming the field and the fix. train.py calls it before
  anything loads; the optimiser (lr_schedule) again, for library use."""
  lr, warmup, total = float(train_cfg.lr), int(train_cfg.warmup_steps), int(train_cfg.total_steps)
  if not (math.isfinite(lr) and lr > 0):
    raise ConfigError(f"train.lr={train_cfg.lr}: the learning rate must be a finite number > 0 (a negative one "
                      "trains away from the data); set e.g. --config.train.lr=1e-4")
  if int(train_cfg.get("batch_size", 1)) < 1:
    raise ConfigError(f"train.batch_size={train_cfg.batch_size}: must be >= 1 sequences per step; set e.g. "
                      "--config.train.batch_size=8")
  if total < 1:
    raise ConfigError(f"train.total_steps={total}: must be >= 1; set e.g. --config.train.total_steps=1000")
  if warmup < 0 or total <= warmup:
    raise ConfigError(f"train.total_steps={total} must exceed train.warmup_steps={warmup} (and warmup >= 0); "
                      "lower --config.train.warmup_steps or raise --config.train.total_steps")


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then cosine decay to lr * end_lr_ratio at total_steps."""
  check_train_settings(train_cfg)
  lr, warmup, total = float(train_cfg.lr), int(train_cfg.warmup_steps), int(train_cfg.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total,
      end_value=lr * float(train_cfg.end_lr_ratio))


def _decay_mask(params):
  def keep(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not (names and names[-1] in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg) -> tuple:
  """(optax transformation, lr schedule) from config.train."""
  schedule = lr_schedule(train_cfg)
  parts = []
  if float(train_cfg.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(train_cfg.b1), b2=float(train_cfg.b2), eps=float(train_cfg.eps),
                           weight_decay=float(train_cfg.weight_decay), mask=_decay_mask))
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

"""The generic training machinery: one sharded jitted train step, and the loop around it.

A method (EAGLE-3, VSD) supplies only

    loss_fn(trainable_params, frozen, batch, rng) -> (loss float32 [], {name: scalar} metrics)
      or, for a method that carries state between steps (train_loop(method_state=initial pytree)),
    loss_fn(trainable_params, frozen, batch, rng, method_state) -> (loss, (metrics, new method_state))
    init_params(rng) -> trainable params (Flax-boxed leaves carry logical axis names)
    frozen: pytree of arrays the loss reads but never trains (target weights, embedding, vocab maps)
    make_batches(start_step) -> iterable of batches (dict of [B, ...] host arrays), beginning with the
      batch of step `start_step`; it must depend only on the seed and start_step so that a resumed
      run sees exactly the batches an uninterrupted one would. With several processes each yields
      its own [B / process_count, ...] slice of the global batch.

Steps are numbered from 1: step s applies the s-th update, using batch s-1 of make_batches(0) and
rng fold_in(state.rng, s-1); checkpoint s holds the state after step s. The loop logs to
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tensorboard), saves every train.checkpoint_every
steps, resumes from the latest checkpoint, stops with NonFiniteLossError on a NaN/inf loss or gradient
(checked at log steps and before every save, so steps are not synchronised with the host one by one; no
state from that step on is saved), and on SIGTERM saves the current step and returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from vsd_jax import parallel
from vsd_jax.methods.base import Method
from vsd_jax.resolved import as_resolved
from vsd_jax.training.checkpoints import Checkpoints
from vsd_jax.training.metrics_writer import MetricsWriter, mean_metrics
from vsd_jax.training.state import TrainState, create_train_state, make_optimizer, state_shardings

LossFn = Callable[[Any, Any, Any, jax.Array], tuple]


class NonFiniteLossError(FloatingPointError):
  def __init__(self, step: int, metrics: dict, last_checkpoint: Optional[int], directory: str):
    self.step, self.metrics, self.last_checkpoint = step, metrics, last_checkpoint
    kept = ("no checkpoint was saved yet" if last_checkpoint is None
            else f"the last good checkpoint is step {last_checkpoint} in {directory}")
    shown = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
    super().__init__(
        f"non-finite loss or gradient at step {step} (batch {step - 1} of the data; {shown}); training "
        f"stopped and this state was not saved; {kept}. Fix: lower train.lr, raise train.warmup_steps or "
        f"check that batch; rerunning resumes from the last good checkpoint.")


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int             # steps completed
  stopped: str          # "done", "preempted" (SIGTERM) or "data_exhausted"
  metrics: dict         # the last logged metrics (host floats)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh, rules,
                    shardings: TrainState, frozen_shardings: Any, batch_shardings: Any,
                    lr_schedule: Optional[optax.Schedule] = None, stateful: bool = False) -> Callable:
  """One jitted, sharded update: (state, frozen, batch) -> (new state, metrics).

  The state argument is donated. Metrics: the loss_fn's metrics plus "loss", "grad_norm" (before
  clipping), "lr" (with lr_schedule) and "finite" (bool: loss and gradient norm are finite). When not
  finite the returned state is the input state unchanged, so no NaN ever reaches the parameters.
  Model code may use nn.with_logical_constraint: the step is traced under the mesh and `rules`.
  stateful: loss_fn takes state.method_state and returns (loss, (metrics, new method_state)).
  """
  replicated = parallel.replicated(mesh)

  def step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if stateful:
      (loss, (aux, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, frozen, batch, rng, state.method_state)
    else:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, rng)
      method_state = state.method_state
    for k, v in aux.items():
      if jnp.shape(v) != ():
        raise ValueError(f"loss_fn metric {k!r} has shape {jnp.shape(v)}; metrics must be scalars "
                         f"(reduce it in the loss function)")
    if jnp.shape(loss) != ():
      raise ValueError(f"loss_fn returned a loss of shape {jnp.shape(loss)}; it must be a scalar")
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                     method_state=method_state)
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
    metrics.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                   finite=finite)
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    return new, metrics

  jitted = jax.jit(step, in_shardings=(shardings, frozen_shardings, batch_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  def run(state: TrainState, frozen, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(state, frozen, batch)

  run.jitted = jitted
  return run


class MethodSteps:
  """A training method's train state and its one jitted, sharded update: `metrics = steps(host_batch)`.

  The step driver of train_loop (which adds checkpoints, logging and the NaN stop) and of benchmarks and
  experiments that drive steps themselves.

  Args:
    config: the run's ConfigDict (train.* for the optimiser, through `resolve`; mesh.* unless `mesh` / `rules` are
      given).
    method: a vsd_jax.methods.base.Method (init_params, loss_fn, frozen, method_state; draft is unused).
    mesh, rules: default parallel.make_mesh(config) and parallel.logical_axis_rules(config).
    seed: a fresh state's parameters and step rngs come from PRNGKey(seed).
    frozen_shardings: NamedShardings for method.frozen; default: the shardings its arrays already have on
      `mesh`, replicated otherwise (parallel.target_frozen_shardings gives the target's logical layout).
  Attributes:
    state: the TrainState; created fresh (directly into its shardings) when first read unless set before,
      e.g. to a checkpoint restored into `abstract_state`.
    abstract_state / shardings: the TrainState of ShapeDtypeStructs / NamedShardings the state has.
    frozen: method.frozen placed on the mesh. step_fn: the jitted step (built on the first batch).
  """

  def __init__(self, config, method: Method, mesh=None, rules=None, seed: int = 0, *,
               frozen_shardings: Any = None):
    self.mesh = parallel.make_mesh(config) if mesh is None else mesh
    self.rules = parallel.logical_axis_rules(config) if rules is None else rules
    self.method, self.seed = method, int(seed)
    self.tx, self.schedule = make_optimizer(as_resolved(config).train)
    self.abstract_state, self.shardings = state_shardings(
        method.init_params, self.tx, jax.random.PRNGKey(self.seed), self.mesh, self.rules, method.method_state)
    if frozen_shardings is None:
      frozen_shardings = parallel.shardings_of(method.frozen, self.mesh)
    self.frozen_shardings = frozen_shardings
    self.frozen = parallel.place(method.frozen, frozen_shardings)
    self._state: Optional[TrainState] = None
    self.step_fn, self.batch_shardings = None, None

  @property
  def state(self) -> TrainState:
    if self._state is None:
      self._state = create_train_state(self.method.init_params, self.tx, jax.random.PRNGKey(self.seed),
                                       self.shardings, self.method.method_state)
    return self._state

  @state.setter
  def state(self, value: TrainState) -> None:
    self._state = value

  def __call__(self, host_batch: dict) -> dict:
    """One update on a host batch (this process's [B_local, ...] rows); returns the step's metrics as device
    arrays (no host sync; "finite" says whether the update was applied). The step is built on the first batch:
    batch shardings depend only on each array's rank, and jit compiles once per shape."""
    if self.step_fn is None:
      self.batch_shardings = parallel.batch_shardings(host_batch, self.mesh, self.rules)
      self.step_fn = make_train_step(
          self.method.loss_fn, self.tx, mesh=self.mesh, rules=self.rules, shardings=self.shardings,
          frozen_shardings=self.frozen_shardings, batch_shardings=self.batch_shardings,
          lr_schedule=self.schedule, stateful=self.method.method_state is not None)
    self.state, metrics = self.step_fn(self.state, self.frozen,
                                       parallel.shard_batch(host_batch, self.batch_shardings))
    return metrics


class _StepHistory:
  """The device metrics of the steps since the last log step. Their "finite" flags stay on device until
  `check`, so a step costs no host round trip; `check` fetches the flags not yet checked."""

  def __init__(self, first_step: int):
    self.first_step = first_step   # the step of metrics[0]
    self.metrics: list = []
    self._checked = 0              # metrics[:_checked] are known finite

  def append(self, metrics: dict) -> None:
    self.metrics.append(metrics)

  def check(self, last_saved: Optional[int], directory: str) -> None:
    """Raise NonFiniteLossError naming the first non-finite step (with its metrics) if there is one."""
    flags = jax.device_get([m["finite"] for m in self.metrics[self._checked:]])
    for i, ok in enumerate(flags, start=self._checked):
      if not bool(ok):
        shown = {k: float(v) for k, v in jax.device_get(self.metrics[i]).items() if k != "finite"}
        raise NonFiniteLossError(self.first_step + i, shown, last_saved, directory)
    self._checked = len(self.metrics)

  def drain(self) -> list:
    """The (checked) metrics as host dicts without "finite"; the history restarts after them."""
    host = [{k: v for k, v in m.items() if k != "finite"} for m in jax.device_get(self.metrics)]
    self.first_step += len(self.metrics)
    self.metrics, self._checked = [], 0
    return host


class _SigtermFlag:
  """Records SIGTERM instead of dying, so the loop can save and return (single process, main thread).

  With several processes JAX's own preemption notifier owns SIGTERM and all processes agree on the
  step to stop at through Checkpoints.reached_preemption, so no Python handler is installed.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def _handle(self, signum, frame):
    self.received = True

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _write_config(config) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(config.workdir, exist_ok=True)
  with open(os.path.join(config.workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
            else json.dumps(dict(config), indent=2))


def train_loop(config, loss_fn: LossFn, init_params: Callable, frozen: Any,
               make_batches: Callable[[int], Iterable], *, mesh=None, frozen_shardings: Any = None,
               stop_step: Optional[int] = None, method_state: Any = None) -> TrainResult:
  """Train until config.train.total_steps (or `stop_step`), resuming from <workdir>/checkpoints.

  The steps run on MethodSteps. Finiteness is checked on the host only at log steps and before every
  checkpoint save (periodic, final, SIGTERM, data exhausted), not after each step, so JAX's asynchronous
  dispatch is never blocked in between: a non-finite step k raises NonFiniteLossError naming k by the next
  log step at the latest, and no checkpoint holds a state from after it.

  Args:
    config: the run's ConfigDict (seed, workdir, mesh.*, train.*).
    loss_fn, init_params, frozen, make_batches: see the module docstring.
    mesh: default parallel.make_mesh(config).
    frozen_shardings: NamedShardings for `frozen`; default: the shardings its arrays already have on
      `mesh` (parallel.place them first to shard the target), replicated otherwise;
      parallel.target_frozen_shardings gives the layout train.py uses.
    stop_step: stop after this step (a partial run); the lr schedule still spans train.total_steps.
    method_state: initial state a stateful loss_fn carries between steps (checkpointed with the rest);
      None = loss_fn has the 4-argument form.
  Returns:
    TrainResult. Raises NonFiniteLossError, checkpoints.CorruptCheckpointError (see
    train.resume_fallback) or checkpoints.CheckpointMismatchError.
  """
  settings = as_resolved(config)
  t = settings.train
  stop = t.total_steps if stop_step is None else int(stop_step)
  steps = MethodSteps(config, Method(None, init_params, loss_fn, frozen, method_state), mesh=mesh,
                      seed=settings.seed, frozen_shardings=frozen_shardings)

  ckpt = Checkpoints.from_config(config)
  restored = None
  if t.resume:
    restored = ckpt.restore_latest(steps.abstract_state, fallback=t.resume_fallback)
  elif ckpt.latest_step() is not None:
    ckpt.close()
    raise FileExistsError(f"train.resume=False but {ckpt.directory} holds checkpoints (steps "
                          f"{ckpt.all_steps()}); use another workdir or delete them")
  start, last_saved = 0, None
  if restored is not None:
    steps.state, meta = restored
    start = last_saved = int(meta["step"])
    logging.info("resumed from %s at step %d", ckpt.step_dir(start), start)

  _write_config(config)
  writer = MetricsWriter(config.workdir, start_step=start)
  log_every, ckpt_every = t.log_every, t.checkpoint_every  # both >= 1 (resolve)

  step, stopped, logged = start, "done", {}
  history = _StepHistory(first_step=start + 1)

  def save():
    nonlocal last_saved
    history.check(last_saved, ckpt.directory)  # never save a state from after a non-finite step
    ckpt.save(step, steps.state)
    last_saved = step

  bar = tqdm(total=stop, initial=min(start, stop), desc="train", dynamic_ncols=True,
             disable=not t.progress_bar or jax.process_index() != 0)
  interval_start = time.time()
  try:
    with _SigtermFlag() as sigterm:
      batches = iter(make_batches(start)) if step < stop else iter(())
      while step < stop:
        try:
          host_batch = next(batches)
        except StopIteration:
          stopped = "data_exhausted"
          logging.warning("make_batches(%d) ran out of data after step %d (train stops before %d)",
                          start, step, stop)
          break
        history.append(steps(host_batch))
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == stop:
          history.check(last_saved, ckpt.directory)
          interval = history.drain()
          logged = mean_metrics(interval)
          now = time.time()
          logged["steps_per_sec"] = len(interval) / max(now - interval_start, 1e-9)
          interval_start = now
          writer.write(step, logged)
          bar.set_postfix(loss=f"{logged['loss']:.4f}")
        if step % ckpt_every == 0 or step == stop:
          save()
        preempted = sigterm.received if jax.process_count() == 1 else ckpt.reached_preemption(step)
        if preempted:
          if last_saved != step:
            save()
          stopped = "preempted"
          logging.warning("SIGTERM: saved step %d to %s; stopping", step, ckpt.step_dir(step))
          break
    history.check(last_saved, ckpt.directory)  # no result from after a non-finite step either
    if stopped == "data_exhausted" and step > start and last_saved != step:
      save()
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return TrainResult(state=steps.state, step=step, stopped=stopped, metrics=logged)

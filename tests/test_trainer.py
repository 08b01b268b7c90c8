"""The generic trainer on a toy next-token model: mesh equivalence, exact resume, SIGTERM, NaN, corruption.

Runs on 8 host CPU devices (see tests/conftest.py).
"""

from tests.multidevice import needs_8_devices, subprocess_env

import functools
import glob
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vsd_jax import parallel
from vsd_jax.config_base import base_config
from vsd_jax.training.checkpoints import Checkpoints, CorruptCheckpointError
from vsd_jax.training.trainer import NonFiniteLossError, train_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, E, M, T, B = 32, 16, 32, 8, 8   # vocab, embed, mlp width, sequence length, batch


# ---- the toy method: a frozen embedding (like the target's) and a trainable MLP head ----

class ToyHead(nn.Module):
  @nn.compact
  def __call__(self, h, rng):
    """h: [B, T, E] embedded tokens -> logits [B, T, V]; dropout from `rng`."""
    lp = nn.with_logical_partitioning
    x = nn.Dense(M, kernel_init=lp(nn.initializers.normal(0.3), ("embed", "mlp")), use_bias=False)(h)
    x = nn.with_logical_constraint(nn.gelu(x), ("batch", "length", "mlp"))  # needs the step's rules
    keep = jax.random.bernoulli(rng, 0.9, x.shape)
    x = jnp.where(keep, x / 0.9, 0.0)
    h = h + nn.Dense(E, kernel_init=lp(nn.initializers.normal(0.3), ("mlp", "embed")), use_bias=False)(x)
    scale = self.param("scale", lp(nn.initializers.ones, ("norm",)), (E,))
    h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * scale
    return nn.Dense(V, kernel_init=lp(nn.initializers.normal(0.3), ("embed", "vocab")), use_bias=False)(h)


def init_params(rng):
  return ToyHead().init(rng, jnp.zeros((1, T, E)), jax.random.PRNGKey(0))["params"]


def loss_fn(params, frozen, batch, rng):
  """Next-token cross entropy over batch["mask"]; batch["scale"] [B] multiplies the loss (NaN test)."""
  h = jnp.take(frozen["embed"], batch["ids"], axis=0)
  logits = ToyHead().apply({"params": params}, h, rng)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:])
  mask = batch["mask"][:, 1:]
  loss = jnp.sum(ce * mask) / jnp.sum(mask) * jnp.mean(batch["scale"])
  acc = jnp.sum((logits[:, :-1].argmax(-1) == batch["ids"][:, 1:]) * mask) / jnp.sum(mask)
  return loss, {"accuracy": acc}


def frozen_embedding():
  return {"embed": jax.random.normal(jax.random.PRNGKey(42), (V, E))}


def make_batches(start, nan_at=None):
  """Batch i depends only on i: sequences x_{t+1} = (3 x_t + 1) mod V from random starts."""
  i = start
  while True:
    r = np.random.default_rng(1000 + i)
    ids = np.zeros((B, T), np.int32)
    ids[:, 0] = r.integers(0, V, B)
    for t in range(1, T):
      ids[:, t] = (3 * ids[:, t - 1] + 1) % V
    mask = (r.random((B, T)) < 0.9).astype(np.float32)
    scale = np.full((B,), np.nan if i == nan_at else 1.0, np.float32)
    yield {"ids": ids, "mask": mask, "scale": scale}
    i += 1


def make_config(workdir, **train):
  c = base_config()
  c.workdir = str(workdir)
  c.seed = 7
  c.train.update(dict(lr=3e-2, warmup_steps=4, total_steps=40, log_every=1, checkpoint_every=10,
                      keep_checkpoints=5, progress_bar=False))
  c.train.update(train)
  return c


def mesh_config(c, data, fsdp, tensor):
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Each train_loop jits afresh; a persistent cache makes the repeats cheap (same HLO, same mesh)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)


_REFERENCE = {}


def reference_40(tmp_path_factory):
  """An uninterrupted 40-step run on the default mesh, computed once: (host params, metrics records)."""
  if not _REFERENCE:
    wd = tmp_path_factory.mktemp("ref40")
    res = train_loop(make_config(wd), loss_fn, init_params, frozen_embedding(), make_batches)
    assert res.step == 40 and res.stopped == "done"
    _REFERENCE["run"] = (jax.device_get(res.state.params), read_metrics(wd))
    _REFERENCE["workdir"] = wd
  return _REFERENCE["run"]


# ---- tests ----

@pytest.mark.slow  # four meshes, each compiles the train step: ~11 s
@needs_8_devices
def test_meshes_give_single_device_losses(tmp_path):
  losses = {}
  for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    c = mesh_config(make_config(tmp_path / "x".join(map(str, shape))), *shape)
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = parallel.make_mesh(c, devices)
    rules = parallel.logical_axis_rules(c)
    # The frozen embedding is sharded by its logical axes too, as the target's would be.
    emb_sh = {"embed": jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(("vocab", "embed"), rules))}
    res = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches, mesh=mesh,
                     frozen_shardings=emb_sh, stop_step=3)
    assert res.step == 3
    if shape == (2, 2, 2):  # parameters really are sharded
      k = res.state.params["Dense_0"]["kernel"]
      assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), k.sharding
      assert res.state.opt_state[1][0].mu["Dense_0"]["kernel"].sharding.spec == k.sharding.spec
    losses[shape] = np.array([r["loss"] for r in read_metrics(c.workdir)])
  ref = losses[(1, 1, 1)]
  assert len(ref) == 3 and np.all(np.isfinite(ref))
  assert ref[2] < ref[0]  # it trains
  for shape, l in losses.items():
    np.testing.assert_allclose(l, ref, rtol=1e-4, err_msg=str(shape))


@needs_8_devices
def test_resume_equals_uninterrupted(tmp_path, tmp_path_factory):
  ref_params, ref_metrics = reference_40(tmp_path_factory)
  c = make_config(tmp_path)
  first = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches, stop_step=20)
  assert first.step == 20 and Checkpoints(os.path.join(tmp_path, "checkpoints")).all_steps() == [10, 20]
  second = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches)
  assert second.step == 40
  assert max_abs_diff(second.state.params, ref_params) <= 1e-6
  ours = read_metrics(tmp_path)
  assert [r["step"] for r in ours] == list(range(1, 41))
  np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in ref_metrics], rtol=1e-6)
  assert os.path.isfile(tmp_path / "config.json") and glob.glob(str(tmp_path / "tensorboard" / "*"))


@needs_8_devices
def test_method_steps_reproduce_the_train_loop(tmp_path_factory):
  """The step driver under train_loop (trainer.MethodSteps), driven by hand from a fresh state and from a
  checkpoint restored into its abstract state, trains exactly like train_loop."""
  from vsd_jax.methods import Method
  from vsd_jax.training.trainer import MethodSteps

  ref_params, ref_metrics = reference_40(tmp_path_factory)
  c = make_config(tmp_path_factory.mktemp("unused"))
  method = Method(None, init_params, loss_fn, frozen_embedding())
  steps = MethodSteps(c, method, seed=c.seed)
  batches = make_batches(0)
  losses = [float(steps(next(batches))["loss"]) for _ in range(40)]
  assert int(steps.state.step) == 40 and steps.step_fn.jitted._cache_size() == 1  # compiled once
  assert max_abs_diff(steps.state.params, ref_params) <= 1e-6
  np.testing.assert_allclose(losses, [r["loss"] for r in ref_metrics], rtol=1e-6)
  # Resumed as train_loop resumes: the reference run's checkpoint 20 restored into abstract_state.
  resumed = MethodSteps(c, method, seed=c.seed)
  ckpt = Checkpoints(os.path.join(_REFERENCE["workdir"], "checkpoints"))
  resumed.state, _ = ckpt.restore(resumed.abstract_state, 20)
  ckpt.close()
  batches = make_batches(20)
  losses = [float(resumed(next(batches))["loss"]) for _ in range(20)]
  assert int(resumed.state.step) == 40 and max_abs_diff(resumed.state.params, ref_params) <= 1e-6
  np.testing.assert_allclose(losses, [r["loss"] for r in ref_metrics[20:]], rtol=1e-6)


@needs_8_devices
def test_resume_onto_another_mesh(tmp_path, tmp_path_factory):
  """A checkpoint written on a (8,1,1) mesh restores into (2,2,2) shardings and trains on."""
  train_loop(mesh_config(make_config(tmp_path), 8, 1, 1), loss_fn, init_params, frozen_embedding(),
             make_batches, stop_step=10)
  res = train_loop(mesh_config(make_config(tmp_path), 2, 2, 2), loss_fn, init_params, frozen_embedding(),
                   make_batches, stop_step=13)
  assert res.state.params["Dense_0"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  ours = [r["loss"] for r in read_metrics(tmp_path)]
  ref = [r["loss"] for r in reference_40(tmp_path_factory)[1][:13]]
  np.testing.assert_allclose(ours, ref, rtol=1e-4)


@needs_8_devices
def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path, tmp_path_factory):
  c = make_config(tmp_path, checkpoint_every=5)
  with pytest.raises(NonFiniteLossError, match=r"step 13 .*last good checkpoint is step 10") as e:
    train_loop(c, loss_fn, init_params, frozen_embedding(), functools.partial(make_batches, nan_at=12))
  assert e.value.step == 13 and e.value.last_checkpoint == 10
  ckpt = Checkpoints(os.path.join(tmp_path, "checkpoints"))
  assert ckpt.all_steps() == [5, 10]
  ckpt.close()
  assert [r["step"] for r in read_metrics(tmp_path)][-1] == 12
  # Rerunning (data fixed) resumes from step 10 and trains on exactly as the uninterrupted run.
  res = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches, stop_step=15)
  ref = reference_40(tmp_path_factory)[1]
  assert res.step == 15 and ref[14]["step"] == 15
  np.testing.assert_allclose(res.metrics["loss"], ref[14]["loss"], rtol=1e-6)


_CLEAN_TO_12 = {}


def clean_checkpoints_to_12(tmp_path_factory):
  """A run without NaN, checkpointed every 2 steps up to 12: (its final state, {step: host params})."""
  if not _CLEAN_TO_12:
    wd = tmp_path_factory.mktemp("clean12")
    c = make_config(wd, log_every=10, checkpoint_every=2, keep_checkpoints=10)
    res = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches, stop_step=12)
    steps = list(range(2, 13, 2))
    _CLEAN_TO_12["run"] = (res.state, {s: _checkpoint_params(wd, s, res.state) for s in steps})
  return _CLEAN_TO_12["run"]


def _checkpoint_params(workdir, step, like):
  """Host params of <workdir>/checkpoints/<step>, restored into the shapes and shardings of state `like`."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"))
  try:
    state, meta = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  assert meta["step"] == step
  return jax.device_get(state.params)


def _watched_batches(ran, nan_at, sigterm_at=None, end=None):
  """make_batches (NaN loss at batch `nan_at`) that records the batch indices handed out in `ran`, sends
  SIGTERM to this process while handing out batch `sigterm_at`, and runs out of data at batch `end`."""
  def batches(start):
    for i, b in enumerate(make_batches(start, nan_at=nan_at), start):
      if i == end:
        return
      if i == sigterm_at:
        # train_loop's handler records the signal; with the default handler it would kill pytest instead.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler installed"
        os.kill(os.getpid(), signal.SIGTERM)
      ran.append(i)
      yield b
  return batches


# NaN at step 13 (batch 12), log_every=10: checked at the log step 20 and before any earlier save.
# (case, train overrides, stop_step, SIGTERM at batch, data ends at batch, steps run, checkpoints left)
NAN_CASES = [
    ("log_step", dict(checkpoint_every=10), None, None, None, 20, [10]),
    ("periodic_save", dict(checkpoint_every=4), None, None, None, 16, [4, 8, 12]),
    ("final_save", dict(checkpoint_every=4), 15, None, None, 15, [4, 8, 12]),
    ("sigterm_save", dict(checkpoint_every=4), None, 14, None, 15, [4, 8, 12]),
    ("data_exhausted_save", dict(checkpoint_every=4), None, None, 15, 15, [4, 8, 12]),
]


@needs_8_devices
def test_nan_is_checked_at_log_steps_and_before_every_save(tmp_path, tmp_path_factory):
  """No host sync per step: a NaN at step 13 stops training by the next log step (20) or before the first save
  after it, naming step 13; every checkpoint left is finite and the state of a step before 13."""
  clean_state, clean_params = clean_checkpoints_to_12(tmp_path_factory)
  for case, train, stop, sigterm_at, end, steps_run, saved in NAN_CASES:
    wd = tmp_path / case
    ran = []
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step 13 \(batch 12 ") as e:
      train_loop(make_config(wd, log_every=10, **train), loss_fn, init_params, frozen_embedding(),
                 _watched_batches(ran, 12, sigterm_at, end), stop_step=stop)
    assert e.value.step == 13 and not np.isfinite(e.value.metrics["loss"]), (case, e.value.metrics)
    # The check waited for the log step or the save (the steps in between ran without a host sync) ...
    assert len(ran) == steps_run <= 20, (case, ran)
    # ... and came before the save: nothing from step 13 on was written.
    ckpt = Checkpoints(os.path.join(wd, "checkpoints"))
    assert ckpt.all_steps() == saved, case
    ckpt.close()
    assert e.value.last_checkpoint == saved[-1], case
    for s in saved:
      params = _checkpoint_params(wd, s, clean_state)
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), (case, s)
      assert max_abs_diff(params, clean_params[s]) <= 1e-6, (case, s)
    assert [r["step"] for r in read_metrics(wd)] == [10], case  # the interval with the NaN is not logged


def _corrupt_latest(directory, step):
  files = [f for f in glob.glob(os.path.join(directory, str(step), "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  assert files, os.listdir(os.path.join(directory, str(step), "state"))
  for f in files:
    n = os.path.getsize(f)
    with open(f, "r+b") as fh:
      fh.write(b"\x5a" * n)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's closed loop
@needs_8_devices
def test_corrupt_checkpoint_error_and_fallback(tmp_path, tmp_path_factory):
  c = make_config(tmp_path)
  train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches, stop_step=20)
  ckdir = os.path.join(tmp_path, "checkpoints")
  _corrupt_latest(ckdir, 20)
  with pytest.raises(CorruptCheckpointError, match=r"checkpoints/20 \(step 20\) is corrupt.*resume_fallback"):
    train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches)
  assert os.path.isdir(os.path.join(ckdir, "20"))  # nothing moved without the option
  c.train.resume_fallback = True
  res = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches)
  assert res.step == 40
  # Resumed from step 10 exactly: the same parameters as the uninterrupted run.
  assert max_abs_diff(res.state.params, reference_40(tmp_path_factory)[0]) <= 1e-6
  assert glob.glob(os.path.join(tmp_path, "checkpoints_corrupt", "20.*"))


@needs_8_devices
def test_checksum_catches_silently_changed_arrays(tmp_path):
  c = make_config(tmp_path)
  train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches, stop_step=10)
  meta_path = os.path.join(tmp_path, "checkpoints", "10", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  key = next(k for k in meta["checksums"] if k.endswith("Dense_1/kernel") and k.startswith("params"))
  meta["checksums"][key] = (meta["checksums"][key] + 1) % 2**32  # as if one stored bit had flipped
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(CorruptCheckpointError, match="Dense_1/kernel"):
    train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches)


def _sigterm_child(workdir):
  """Entry point of the SIGTERM test's subprocess: a long run that prints its TrainResult."""
  c = make_config(workdir, total_steps=100000, checkpoint_every=25, log_every=25)
  res = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches)
  print("RESULT " + json.dumps({"step": res.step, "stopped": res.stopped}), flush=True)


@pytest.mark.slow  # a training subprocess stopped by SIGTERM, then resumed: ~11 s
def test_sigterm_saves_and_resume_completes(tmp_path):
  env = subprocess_env()
  code = f"from tests.test_trainer import _sigterm_child; _sigterm_child({str(tmp_path)!r})"
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ckdir = os.path.join(tmp_path, "checkpoints")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if len([d for d in glob.glob(os.path.join(ckdir, "*")) if os.path.basename(d).isdigit()]) >= 2:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-4000:]
  result = json.loads(out.split("RESULT ", 1)[1])
  assert result["stopped"] == "preempted" and 50 <= result["step"] < 100000
  ckpt = Checkpoints(ckdir)
  assert ckpt.latest_step() == result["step"], (ckpt.all_steps(), result)
  ckpt.close()
  # Resume completes (here to 10 steps past the interruption).
  stop = result["step"] + 10
  c = make_config(tmp_path, total_steps=100000, checkpoint_every=25, log_every=1)
  res = train_loop(c, loss_fn, init_params, frozen_embedding(), make_batches, stop_step=stop)
  assert res.step == stop and res.stopped == "done"
  assert read_metrics(tmp_path)[-1]["step"] == stop

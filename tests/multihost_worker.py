"""One process of the multi-host tests (tests/test_multihost.py): trains the toy method of
tests/test_trainer.py with train_loop over a mesh spanning every process, and prints its result.

  python -m tests.multihost_worker WORKDIR PROCESS_ID NUM_PROCESSES PORT STOP_STEP [TOTAL_STEPS]

The data stage split across processes (tests/test_sharded_data.py): STAGE "regenerate" (a counting stand-in for
the target answers the prompts; data.regenerate) or "features" (the tiny target's feature pass, then process 0
trains an EAGLE-3 draft on the cache for a few steps; with several processes the target is loaded onto the mesh of
all of them and each reads it again onto its own devices), into the cache under WORKDIR; every prompt or sequence computed is
appended to WORKDIR/computed-<process>.jsonl. DIE_AFTER > 0: the process kills itself (SIGKILL) when it is about to
compute its batch DIE_AFTER + 1. DEVICE_BARRIER=1 in the environment: process barriers go through a device
collective (what parallel.process_barrier does when the coordination client has no barrier).

  python -m tests.multihost_worker data STAGE WORKDIR PROCESS_ID NUM_PROCESSES PORT [DIE_AFTER]

NUM_PROCESSES=1 runs without jax.distributed. The caller sets XLA_FLAGS (host devices per process).
"""

import json
import os
import signal
import sys

import numpy as np

import jax


def main(workdir, pid, nproc, port, stop_step, total_steps=40):
  from vsd_jax import parallel
  from tests import test_trainer as toy
  from vsd_jax.training.trainer import train_loop

  c = toy.make_config(workdir, total_steps=total_steps, checkpoint_every=25, log_every=1)
  if nproc > 1:
    c.mesh.distributed = "on"
    c.mesh.coordinator_address = f"localhost:{port}"
    c.mesh.num_processes, c.mesh.process_id = nproc, pid
  parallel.maybe_initialize_distributed(c)
  # (data=2, fsdp=1, tensor=-1): the batch and the parameters are both split across the processes.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, -1

  def make_batches(start):
    for b in toy.make_batches(start):
      yield parallel.process_local_slice(b)

  res = train_loop(c, toy.loss_fn, toy.init_params, toy.frozen_embedding(), make_batches, stop_step=stop_step)
  kernel = res.state.params["Dense_0"]["kernel"]
  print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                "devices": jax.device_count(), "step": res.step, "stopped": res.stopped,
                                "mesh": dict(parallel.make_mesh(c).shape),
                                "kernel_spec": str(kernel.sharding.spec)}), flush=True)


NUM_PROMPTS = 14


def prompts():
  """Distinct prompts of 1..6 tokens."""
  rng = np.random.default_rng(0)
  return [[10 + n] + rng.integers(3, 50, n % 6).tolist() for n in range(NUM_PROMPTS)]


def response_of(prompt):
  """The stand-in target's answer: depends on the prompt only, never on its batch."""
  return [sum(prompt) % 40 + 3, len(prompt) + 3, 2]


def feature_dataset():
  from vsd_jax.data.dataset import SequenceDataset
  rng = np.random.default_rng(0)
  seqs, masks = [], []
  for _ in range(10):
    length = int(rng.integers(8, 20))
    seqs.append(rng.integers(0, 8, length))
    masks.append((np.arange(length) >= 4).astype(np.int32))
  return SequenceDataset(seqs, masks)


class Recorder:
  """Appends what each new batch computes to `path` (flushed), and dies before batch die_after + 1."""

  def __init__(self, path, die_after):
    self.path, self.die_after, self.batches = path, die_after, 0

  def batch(self, items):
    if self.die_after and self.batches == self.die_after:
      os.kill(os.getpid(), signal.SIGKILL)
    self.batches += 1
    with open(self.path, "a") as f:
      for x in items:
        f.write(json.dumps(x) + "\n")


def write_target_dir(directory):
  """The tiny target (tests.tiny_models.tiny_target) as an HF directory (config.json + safetensors) -> its path."""
  from safetensors.numpy import save_file

  from tests.tiny_models import tiny_target
  from vsd_jax.weights.convert import hf_config_dict, hf_tensors_from_params
  model, params = tiny_target()
  os.makedirs(directory, exist_ok=True)
  save_file(hf_tensors_from_params(model.cfg, jax.tree.map(np.asarray, params)),
            os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config_dict(model.cfg), f)
  return directory


def data_main(stage, workdir, pid, nproc, port, die_after=0):
  import jax
  if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    if os.environ.get("DEVICE_BARRIER"):  # parallel.process_barrier's other path: a client without wait_at_barrier
      from jax._src import distributed

      class WithoutBarrier:
        def __init__(self, client):
          self._client = client

        def __getattr__(self, name):
          if name == "wait_at_barrier":
            raise AttributeError(name)
          return getattr(self._client, name)

      jax.devices()  # the CPU backend's collectives are built on the real client first
      distributed.global_state.client = WithoutBarrier(distributed.global_state.client)
  os.makedirs(workdir, exist_ok=True)
  rec = Recorder(os.path.join(workdir, f"computed-{pid}.jsonl"), die_after)
  result = {"process": jax.process_index(), "processes": jax.process_count()}
  if stage == "regenerate":
    from vsd_jax.data.regenerate import regenerate
    last = {}

    def call(ids, lens):  # run_batches calls each new shape twice; the repeat is answered from memory
      key = (ids.tobytes(), lens.tobytes())
      if last.get("key") != key:
        rows = {tuple(int(t) for t in ids[r, :lens[r]]) for r in range(len(ids))}  # pad rows repeat a prompt
        rec.batch(sorted(list(r) for r in rows))
        out = np.zeros((len(ids), 3), np.int32)
        for r in range(len(ids)):
          out[r] = response_of([int(t) for t in ids[r, :lens[r]]])
        last.update(key=key, out=(out, np.full(len(ids), 3, np.int32), np.ones(len(ids), np.int32)))
      return last["out"]

    result["responses"] = regenerate(prompts(), call, os.path.join(workdir, "cache", "responses-k.jsonl"), 2, 0,
                                     progress=False, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  else:
    import types

    import flax.linen as nn
    import optax

    from tests.tiny_models import vocab_maps
    from vsd_jax.config_base import base_config
    from vsd_jax.data.dataset import iterate_batches
    from vsd_jax.methods import eagle3
    from vsd_jax.training import feature_cache

    from vsd_jax import parallel
    from vsd_jax.weights import local, registry

    c = base_config()
    c.model.dtype = c.model.param_dtype = "float32"
    c.draft.ttt_steps = 1
    source = write_target_dir(os.path.join(workdir, f"target-{pid}"))
    # With several processes the target is on the mesh of all of them, as training places it; the feature pass
    # (and the training below) read it again onto this process's devices (weights.local.process_local_target).
    mesh = parallel.make_mesh(c) if nproc > 1 else None
    target = registry.load_target(source, with_tokenizer=False, mesh=mesh,
                                  rules=parallel.logical_axis_rules(c) if mesh is not None else None)
    result["spread"] = not local.is_process_local(target.params)
    real_load, reloads = registry.load_target, []

    def counting_load(*a, **k):
      reloads.append(a[0])
      return real_load(*a, **k)

    registry.load_target = counting_load
    d2t, t2d = vocab_maps(8, range(2, 8))
    vocab = types.SimpleNamespace(d2t=np.asarray(d2t), t2d=np.asarray(t2d))
    ds = feature_dataset()
    real_pad = feature_cache.pad_batch

    def recording_pad(dataset, indices, *a, **k):
      rec.batch([int(i) for i in indices if i >= 0])
      return real_pad(dataset, indices, *a, **k)

    feature_cache.pad_batch = recording_pad
    cache = feature_cache.build_feature_cache(target, ds, vocab.d2t, vocab.t2d, os.path.join(workdir, "features"),
                                              batch_size=2, buckets=(20,), config=c)
    result["reloads"] = len(reloads)
    if jax.process_index() != 0:  # the cache is the same for every process: one of them trains on it
      print("RESULT " + json.dumps(result), flush=True)
      return
    m = eagle3.build(c, local.process_local_target(target, c), vocab)
    draft = nn.unbox(jax.jit(m.init_params)(jax.random.PRNGKey(0)))
    opt = optax.sgd(0.1)
    opt_state = opt.init(draft)

    @jax.jit
    def step(p, s, batch):
      (loss, _), g = jax.value_and_grad(m.loss_fn, has_aux=True)(p, m.frozen, batch, jax.random.PRNGKey(0))
      updates, s = opt.update(g, s, p)
      return optax.apply_updates(p, updates), s, loss

    losses = []
    for batch in feature_cache.with_cached_targets(
        iterate_batches(ds, 4, seed=1, buckets=(20,), drop_last=False, with_index=True), cache, vocab.t2d):
      draft, opt_state, loss = step(draft, opt_state, batch)
      losses.append(float(loss))
    result["losses"] = losses
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  a = sys.argv[1:]
  if a[0] == "data":
    data_main(a[1], a[2], *(int(x) for x in a[3:]))
    sys.exit(0)
  main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), *(int(x) for x in a[5:]))

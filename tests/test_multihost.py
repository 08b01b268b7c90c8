"""Multi-host training on localhost: 2 processes (jax.distributed, CPU backend, gloo collectives), each
with 2 host devices, train over one (data=2, tensor=2) mesh spanning both. Each process runs
tests/multihost_worker.py; the comparison runs are 1 process with 4 devices on the same mesh shape.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices):
  # Replaces the 8-device XLA_FLAGS that tests/conftest.py set for this pytest process.
  flags = f"--xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    env.pop(var, None)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, nproc, stop_step, total_steps=40):
  port = _free_port()
  return [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(workdir), str(i), str(nproc),
                            str(port), str(stop_step), str(total_steps)],
                           cwd=REPO, env=_env(4 // nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(nproc)]


def _finish(procs, timeout=120):
  results = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0 and "RESULT " in out, f"rc={p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
  return results


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _steps(workdir):
  return sorted(int(os.path.basename(d)) for d in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                if os.path.basename(d).isdigit())


@pytest.mark.slow
def test_two_processes_equal_one_and_checkpoint_restores_in_one(tmp_path):
  two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "two"
  # The 2-process run and the 1-process reference run side by side (2 + 1 processes on the 2 cores).
  procs2, procs1 = _start(two, 2, 3), _start(one, 1, 5)
  r2, r1 = _finish(procs2), _finish(procs1)
  assert [r["processes"] for r in r2] == [2, 2] and all(r["devices"] == 4 and r["step"] == 3 for r in r2)
  assert r2[0]["mesh"] == r1[0]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert r2[0]["kernel_spec"] == "P('fsdp', 'tensor')"  # parameters really are split across hosts
  assert _steps(two) == [3]  # one checkpoint, written by both processes together
  l2, l1 = _losses(two), _losses(one)
  assert sorted(l2) == [1, 2, 3]
  np.testing.assert_allclose([l2[s] for s in (1, 2, 3)], [l1[s] for s in (1, 2, 3)], rtol=1e-5)
  # The 2-process checkpoint restores in a 1-process run, which then trains exactly like the reference.
  r = _finish(_start(resumed, 1, 5))[0]
  assert r["processes"] == 1 and r["step"] == 5 and _steps(resumed) == [3, 5]
  lr = _losses(resumed)
  np.testing.assert_allclose([lr[s] for s in (4, 5)], [l1[s] for s in (4, 5)], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_on_one_host_saves_one_checkpoint_and_resumes(tmp_path):
  procs = _start(tmp_path, 2, 100000, total_steps=100000)
  deadline = time.time() + 90
  while time.time() < deadline and all(p.poll() is None for p in procs) and 50 not in _steps(tmp_path):
    time.sleep(0.05)
  assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
  procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
  results = _finish(procs)
  # JAX's preemption sync point: both processes stop after the same step and save it together.
  assert [r["stopped"] for r in results] == ["preempted", "preempted"]
  step = results[0]["step"]
  assert results[1]["step"] == step and 50 <= step < 100000
  assert _steps(tmp_path)[-1] == step
  losses = _losses(tmp_path)
  assert max(losses) == step
  # A fresh 2-process run resumes from that checkpoint and goes on.
  resumed = _finish(_start(tmp_path, 2, step + 3, total_steps=100000))
  assert all(r["step"] == step + 3 and r["stopped"] == "done" for r in resumed)
  after = _losses(tmp_path)
  assert sorted(after)[-4:] == [step, step + 1, step + 2, step + 3] and after[step] == losses[step]


def test_process_local_slice_keeps_this_hosts_rows():
  from vsd_jax import parallel
  batch = {"ids": np.arange(12).reshape(6, 2), "t": np.asarray(3)}
  parts = [parallel.process_local_slice(batch, i, 3) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate([p["ids"] for p in parts]), batch["ids"])
  assert parts[1]["ids"].tolist() == [[4, 5], [6, 7]] and int(parts[2]["t"]) == 3
  assert parallel.process_local_slice(batch, 0, 1) is batch
  with pytest.raises(parallel.MeshError, match="not divisible by the 4 processes"):
    parallel.process_local_slice(batch, 0, 4)

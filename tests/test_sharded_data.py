"""The data stage split across processes: response regeneration (data.regenerate) and the precomputed feature pass
(training.feature_cache), each process computing its own shard, then every process reading all of them.

The multi-process tests run tests/multihost_worker.py in its `data` mode: 2 processes (jax.distributed on
localhost, CPU) against 1, one process killed mid-way and both restarted.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from tests.test_multihost import REPO, _env, _finish, _free_port
from tests import multihost_worker as worker
from vsd_jax.data.regenerate import (RegenerationError, cache_files, prompt_key, read_cache, read_cache_set,
                                     regenerate, shard_owner, shard_path)


# --- fast: ownership, the merged reader, a missing shard, the free-space refusal ----------------------------------

def test_shard_owner_is_stable_disjoint_and_spread():
  keys = [prompt_key([i, i + 1]) for i in range(400)]
  for n in (1, 2, 3, 8):
    owners = [shard_owner(k, n) for k in keys]
    assert owners == [shard_owner(k, n) for k in keys] and set(owners) == set(range(n))
    assert min(np.bincount(owners)) > 400 / n * 0.7  # about even
  assert shard_owner(keys[0], 1) == 0
  assert shard_path("/c/responses-ab.jsonl", 1, 4) == "/c/responses-ab.1-of-4.jsonl"
  assert shard_path("/c/responses-ab.jsonl", 0, 1) == "/c/responses-ab.jsonl"


def _write(path, records, tail=""):
  with open(path, "w") as f:
    f.write("".join(json.dumps({"key": k, "response": r}) + "\n" for k, r in records) + tail)


def test_reader_merges_any_shard_layout(tmp_path, caplog):
  path = str(tmp_path / "responses-x.jsonl")
  _write(path, [("a", [1])])
  _write(shard_path(path, 0, 2), [("b", [2])])
  _write(shard_path(path, 1, 2), [("c", [3])], tail='{"key": "d", "resp')  # being written by its process
  _write(shard_path(path, 2, 3), [("d", [4])])
  _write(str(tmp_path / "responses-y.jsonl"), [("z", [9])])  # another cache: not read
  assert len(cache_files(path)) == 4
  with caplog.at_level("WARNING"):
    merged = read_cache_set(path, quiet=[shard_path(path, 1, 2)])
  assert merged == {"a": [1], "b": [2], "c": [3], "d": [4]} and not caplog.records
  assert read_cache(shard_path(path, 0, 2)) == {"b": [2]}


class Counting:
  """A stand-in target whose answer depends on the prompt only; counts the prompts it generates."""

  def __init__(self):
    self.prompts = []

  def __call__(self, ids, lens):
    rows = [[int(t) for t in ids[r, :lens[r]]] for r in range(len(ids))]
    self.prompts += rows
    out = np.asarray([worker.response_of(r) for r in rows], np.int32)
    return out, np.full(len(ids), 3, np.int32), np.ones(len(ids), np.int32)


def test_regenerate_in_shards_one_process_after_another(tmp_path):
  """Two shares generated one after the other in this process (the barrier a no-op): the first to finish finds the
  other's prompts missing and says whose shard they belong to; once both are there, every layout reads them."""
  prompts = worker.prompts()
  want = [worker.response_of(p) for p in prompts]
  path = str(tmp_path / "c" / "responses-k.jsonl")
  owners = [shard_owner(prompt_key(p), 2) for p in prompts]
  first = Counting()
  with pytest.raises(RegenerationError, match=r"process 0: \d+ in .*responses-k\.0-of-2\.jsonl \(no such file\)"):
    regenerate(prompts, first, path, 2, 0, progress=False, process_index=1, process_count=2, barrier=lambda: None)
  second = Counting()
  assert regenerate(prompts, second, path, 2, 0, progress=False, process_index=0, process_count=2,
                    barrier=lambda: None) == want
  mine = lambda calls: sorted({tuple(r) for r in calls.prompts})  # noqa: E731  (pad rows repeat a prompt)
  assert mine(first) == sorted(tuple(p) for p, o in zip(prompts, owners) if o == 1)
  assert mine(second) == sorted(tuple(p) for p, o in zip(prompts, owners) if o == 0)
  again = Counting()
  assert regenerate(prompts, again, path, 2, 0, progress=False) == want and not again.prompts  # 1 reads 2
  assert not os.path.exists(path)  # and wrote nothing
  # 3 processes read what 2 wrote; a new prompt goes to its owner's 3-way shard.
  extra = prompts + [[99, 98]]
  owner = shard_owner(prompt_key([99, 98]), 3)
  calls = Counting()
  assert regenerate(extra, calls, path, 2, 0, progress=False, process_index=owner, process_count=3,
                    barrier=lambda: None)[-1] == worker.response_of([99, 98])
  assert mine(calls) == [(99, 98)] and os.path.exists(shard_path(path, owner, 3))


def test_feature_pass_refuses_a_disk_too_small(tmp_path, monkeypatch, caplog):
  from vsd_jax.data.dataset import SequenceDataset
  from vsd_jax.training import feature_cache

  ds = SequenceDataset([np.arange(100)] * 50, [np.ones(100, np.int32)] * 50)
  target = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=4096))
  sizes = feature_cache.feature_bytes(50, 5000, 4096, 32000)
  assert sizes["features"] == 50 * 100 * 3 * 4096 * 2 and sizes["total"] == 5000 * (3 * 4096 * 2 + 32000 * 2 + 8)
  free = types.SimpleNamespace(free=sizes["total"] - 1)
  monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda p: free)
  with caplog.at_level("INFO"), pytest.raises(feature_cache.FeatureCacheSpaceError,
                                              match=r"train\.target_features=in_step") as e:
    feature_cache.build_feature_cache(target, ds, np.arange(32000), np.ones(40000, bool), str(tmp_path / "f"), 4,
                                      (128,))
  assert "50 sequences, 5000 tokens x 3 x 4096 hidden x 2 bytes = 0.11 GiB of features" in str(e.value)
  assert "0.11 GiB of features" in caplog.text  # logged before anything is computed
  assert not os.path.exists(tmp_path / "f")


def test_process_local_target_reloads_on_this_process_devices(monkeypatch):
  """A target spread across processes is read again onto this process's devices (config's dtypes, decode mesh over
  the local devices); one process, or parameters already local, keep the target as it is."""
  import jax

  from vsd_jax.config_base import base_config
  from vsd_jax.weights import local, registry

  c = base_config()
  c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
  spread = types.SimpleNamespace(is_fully_addressable=False)
  target = registry.Target(model="m", params={"w": spread}, tokenizer="tok", config="cfg", source="/w/target")
  assert local.process_local_target(target, c) is target  # one process
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  seen = {}

  def fake_load(source, **kw):
    seen.update(kw, source=source)
    return types.SimpleNamespace(params={"w": np.ones(2)})

  monkeypatch.setattr(registry, "load_target", fake_load)
  out = local.process_local_target(target, c)
  assert out.params["w"].tolist() == [1, 1] and (out.tokenizer, out.model, out.source) == ("tok", "m", "/w/target")
  assert (seen["source"], seen["dtype"], seen["param_dtype"], seen["with_tokenizer"]) == \
      ("/w/target", "bfloat16", "float32", False)
  assert set(seen["mesh"].devices.flat) <= set(jax.local_devices())
  already = registry.Target(model="m", params={"w": np.ones(2)}, tokenizer=None, config=None, source="")
  assert local.process_local_target(already, c) is already


@pytest.mark.slow
def test_feature_shards_one_process_after_another_equal_one_pass(tmp_path):
  from tests.tiny_models import tiny_target, vocab_maps
  from vsd_jax.training import feature_cache

  model, params = tiny_target()
  target = types.SimpleNamespace(model=model, params=params, config=model.cfg)
  d2t, t2d = (np.asarray(x) for x in vocab_maps(8, range(2, 8)))
  ds = worker.feature_dataset()
  one = feature_cache.build_feature_cache(target, ds, d2t, t2d, str(tmp_path / "one"), 2, (20,))
  two = str(tmp_path / "two")
  with pytest.raises(feature_cache.FeatureCacheError, match="shard-1-of-2"):
    feature_cache.build_feature_cache(target, ds, d2t, t2d, two, 2, (20,), process_index=0, process_count=2,
                                      barrier=lambda: None)
  merged = feature_cache.build_feature_cache(target, ds, d2t, t2d, two, 2, (20,), process_index=1, process_count=2,
                                             barrier=lambda: None)
  assert merged.meta["shards"] == ["shard-0-of-2", "shard-1-of-2"]
  for i in range(len(ds)):
    a, b = one.sequence(i), merged.sequence(i)
    assert a["features"].shape == (ds.lengths[i], 3 * model.cfg.hidden_size)
    for k in a:
      np.testing.assert_allclose(b[k].astype(np.float32), a[k].astype(np.float32), rtol=1e-3, atol=1e-3, err_msg=k)


# --- slow: 2 processes --------------------------------------------------------------------------------------------

def _start(stage, workdir, nproc, die_after=(0, 0), **env):
  port = _free_port()
  return [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", "data", stage, str(workdir), str(i),
                            str(nproc), str(port), str(die_after[i])],
                           cwd=REPO, env=dict(_env(1), PYTHONPATH=REPO, **env), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(nproc)]


def _kill_after_the_first_dies(procs, timeout=90):
  """Wait for the process set to die by itself (DIE_AFTER), then SIGKILL the others: both stopped mid-way."""
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    time.sleep(0.05)
  died = [p.poll() for p in procs]
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
  assert -signal.SIGKILL in died, died


def _computed(workdir, run):
  """[(process, prompt or sequence index)] the processes computed since `run` (the files' lengths then; None: from
  the start), and the files' lengths now."""
  out, lengths = [], []
  for pid in range(2):
    path = os.path.join(workdir, f"computed-{pid}.jsonl")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    out += [(pid, json.loads(x)) for x in lines[run[pid] if run else 0:]]
    lengths.append(len(lines))
  return out, lengths


@pytest.mark.slow
def test_regeneration_split_across_two_processes(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  prompts = worker.prompts()
  # The 1-process reference, and 2 processes of which process 1 dies before its third batch (process 0 is killed
  # once it has, wherever it is).
  ref = _start("regenerate", one, 1)
  _kill_after_the_first_dies(_start("regenerate", two, 2, die_after=(0, 2)))
  r1 = _finish(ref)[0]
  assert r1["responses"] == [worker.response_of(p) for p in prompts]
  ref_lengths = _computed(one, None)[1]
  cache = str(two / "cache" / "responses-k.jsonl")
  finished = set(read_cache_set(cache))
  killed_run, lengths = _computed(two, None)
  assert 0 < len(finished) < len(prompts)
  # Process 1 wrote exactly the batches it finished before dying.
  assert {prompt_key(p) for pid, p in killed_run if pid == 1} == set(read_cache(shard_path(cache, 1, 2)))

  r2 = _finish(_start("regenerate", two, 2, DEVICE_BARRIER="1"))  # the barrier without the coordination service's
  assert [r["processes"] for r in r2] == [2, 2]
  assert r2[0]["responses"] == r2[1]["responses"] == r1["responses"]
  rerun, _ = _computed(two, lengths)
  keys = [prompt_key(p) for _, p in rerun]
  assert len(keys) == len(set(keys))                    # each prompt generated once across the two
  assert set(keys) == {prompt_key(p) for p in prompts} - finished  # and only what was not finished
  assert all(shard_owner(prompt_key(p), 2) == pid for pid, p in rerun)
  # One process reads what two wrote, two read what one wrote: nothing generated.
  r3 = _finish(_start("regenerate", two, 1)) + _finish(_start("regenerate", one, 2))
  assert all(r["responses"] == r1["responses"] for r in r3)
  assert _computed(two, lengths)[0] == rerun and _computed(one, ref_lengths)[0] == []


@pytest.mark.slow
def test_feature_pass_split_across_two_processes(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  n = len(worker.feature_dataset())
  ref = _start("features", one, 1)
  _kill_after_the_first_dies(_start("features", two, 2, die_after=(0, 1)))
  r1 = _finish(ref)[0]
  finished = set()
  for shard in glob.glob(str(two / "features" / "shard-*-of-2")):
    seqs = np.fromfile(os.path.join(shard, "sequences.i64"), np.int64)
    finished |= set(seqs[np.fromfile(os.path.join(shard, "done.u8"), np.uint8) == 1].tolist())
  killed_run, lengths = _computed(two, None)
  assert 0 < len(finished) < n and not os.path.exists(two / "features" / "meta.json")
  assert finished <= {i for _, i in killed_run}

  r2 = _finish(_start("features", two, 2))
  rerun, _ = _computed(two, lengths)
  done = [i for _, i in rerun]
  assert len(done) == len(set(done)) and set(done) == set(range(n)) - finished  # each sequence once, none again
  # Training on the 2-process cache equals training on the 1-process one. (One process reading a 2-process cache:
  # test_feature_shards_one_process_after_another_equal_one_pass.)
  assert [r["processes"] for r in r2] == [2, 2]
  # Each process was given the target on the mesh of both and, when it had sequences left to compute, read it again
  # onto its own devices for the feature pass (process 0 reads it once more to train, after this count; it may have
  # finished its shard before the kill); the single process kept its own.
  assert 1 in {pid for pid, _ in rerun}  # process 1 died mid-way: it had work left
  assert [(r["spread"], r["reloads"]) for r in r2] == [(True, int(any(p == pid for p, _ in rerun))) for pid in (0, 1)]
  assert (r1["spread"], r1["reloads"]) == (False, 0)
  np.testing.assert_allclose(r2[0]["losses"], r1["losses"], rtol=1e-5)

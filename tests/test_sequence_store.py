"""The sequence store (data.sequence_store): batches equal to the in-memory dataset's as it batched before the
store (same seed: same arrays, from step 0 and from a mid-epoch resume, whole or as 2 processes' slices), and a
build that resumes after a kill and is never read while partial."""

import hashlib
import os

import numpy as np
import pytest

from vsd_jax.data.dataset import SequenceDataset, iterate_batches, pick_bucket, bucket_lengths
from vsd_jax.data.sequence_store import StoreError, StoreWriter, build_store, open_store


def reference_batches(ids, masks, batch_size, seed, epoch=0, buckets=None, drop_last=True, sort_window=0):
  """The list-of-arrays dataset's batching as it was before the store (kept verbatim as the oracle)."""
  lengths = np.array([len(x) for x in ids], np.int32)
  buckets = tuple(buckets) if buckets else bucket_lengths(int(lengths.max()))
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(ids))
  if sort_window > 0:
    order = np.concatenate([sorted(order[s:s + sort_window], key=lambda i: lengths[i])
                            for s in range(0, len(order), sort_window)])
  stop = len(order) - len(order) % batch_size if drop_last else len(order)
  groups = [[int(i) for i in order[s:s + batch_size]] for s in range(0, stop, batch_size)]
  if sort_window > 0:
    groups = [groups[j] for j in rng.permutation(len(groups))]
  for idx in groups:
    length = pick_bucket(max(len(ids[i]) for i in idx), buckets)
    b = len(idx)
    out = dict(input_ids=np.zeros((batch_size, length), np.int32), loss_mask=np.zeros((batch_size, length), np.int32),
               attention_mask=np.zeros((batch_size, length), np.int32))
    for row, i in enumerate(idx):
      n = len(ids[i])
      out["input_ids"][row, :n], out["loss_mask"][row, :n], out["attention_mask"][row, :n] = ids[i], masks[i], 1
    out["index"] = np.asarray(idx + [-1] * (batch_size - b), np.int32)
    yield out


def synthetic(n, seed=0, max_len=300):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    t = int(rng.integers(1, max_len + 1))
    ids = rng.integers(0, 50_000, t).astype(np.int32)
    mask = np.zeros(t, np.int32)
    mask[int(rng.integers(0, t)):] = 1
    yield ids, mask


def equal(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("drop_last,sort_window", [(True, 64), (False, 0)])
def test_store_batches_equal_in_memory_whole_resumed_and_per_process(tmp_path, drop_last, sort_window):
  from vsd_jax.parallel import process_local_slice
  pairs = list(synthetic(203, seed=1))
  ids, masks = [p[0] for p in pairs], [p[1] for p in pairs]
  store = build_store(str(tmp_path / "s"), iter(pairs), meta=dict(data="synthetic-1"))
  memory = SequenceDataset(ids, masks)
  assert store.stored and not memory.stored and len(store) == 203
  before = hashlib.sha256()  # the fingerprint as it was computed before the store: caches keyed by it stay valid
  for x, m in zip(ids, masks):
    before.update(np.int64(len(x)).tobytes() + x.astype(np.int32).tobytes() + m.astype(np.int32).tobytes())
  assert store.fingerprint() == memory.fingerprint() == before.hexdigest()[:16]
  assert store.num_loss_tokens() == memory.num_loss_tokens() == sum(int(m.sum()) for m in masks)
  kw = dict(batch_size=8, seed=5, epoch=2, buckets=(64, 128, 300), drop_last=drop_last, sort_window=sort_window)
  ref = list(reference_batches(ids, masks, **kw))
  assert len(ref) == (203 // 8 if drop_last else 26)
  for ds in (memory, store):
    got = list(iterate_batches(ds, with_index=True, **kw))
    assert len(got) == len(ref) and all(equal(a, b) for a, b in zip(got, ref))
    resumed = list(iterate_batches(ds, with_index=True, start=11, **kw))  # a run resumed at step 11 of the epoch
    assert len(resumed) == len(ref) - 11 and all(equal(a, b) for a, b in zip(resumed, ref[11:]))
    for p in range(2):  # 2 processes, each building (and reading) only its rows
      mine = list(iterate_batches(ds, with_index=True, start=3, process_index=p, process_count=2, **kw))
      want = [process_local_slice(b, p, 2) for b in ref[3:]]
      assert len(mine) == len(want) and all(equal(a, b) for a, b in zip(mine, want))
  other = next(iterate_batches(store, with_index=True, **dict(kw, seed=6)))
  assert not equal(other, ref[0])  # the seed matters (the comparison above can fail)


def test_process_slice_reads_only_its_rows(tmp_path):
  store = build_store(str(tmp_path / "s"), synthetic(40, seed=2), meta={})
  reads = []
  real = store.read_into
  store.read_into = lambda i, *out: reads.append(int(i)) or real(i, *out)
  batches = list(iterate_batches(store, 8, seed=0, process_index=1, process_count=2, with_index=True))
  assert sorted(set(reads)) == sorted(int(i) for b in batches for i in b["index"])
  assert len(set(reads)) == 20  # half of the 5 global batches of 8


def test_build_resumes_after_kill_and_partial_is_never_opened(tmp_path):
  d = str(tmp_path / "s")
  pairs = list(synthetic(50, seed=3))
  w = StoreWriter(d, meta=dict(data="x"))
  for p in pairs[:30]:
    w.add(*p)
    if w.done == 20:
      w.commit()
  # Killed after adding 30 but committing 20 (nothing closed, nothing published): not a store yet.
  for f in w._files.values():
    f.flush()
  with pytest.raises(StoreError, match="unfinished build"):
    open_store(d)
  seen = []

  def items():
    for n, p in enumerate(pairs):
      seen.append(n)
      yield p

  added = []
  orig = StoreWriter.add
  StoreWriter.add = lambda self, *a: added.append(self.done) or orig(self, *a)
  try:
    ds = build_store(d, items(), meta=dict(data="x"), commit_every=7)
  finally:
    StoreWriter.add = orig
  assert added == list(range(20, 50))  # resumed at the last commit: nothing committed is written twice
  assert ds.fingerprint() == SequenceDataset.from_pairs(pairs).fingerprint()
  assert all(np.array_equal(ds.input_ids[i], pairs[i][0]) and np.array_equal(ds.loss_mask[i], pairs[i][1])
             for i in range(50))
  assert not [p for p in os.listdir(tmp_path) if ".partial" in p]
  # A finished store is reused as it is; other data under the same name is refused, not mixed in.
  again = build_store(d, iter(()), meta=dict(data="x"))
  assert len(again) == 50 and again.fingerprint() == ds.fingerprint()
  with pytest.raises(StoreError, match="built from other data"):
    build_store(d, iter(()), meta=dict(data="y"))
  # A partial build for other data is started again, not continued.
  w = StoreWriter(str(tmp_path / "t"), meta=dict(data="a"))
  for p in pairs[:5]:
    w.add(*p)
  w.commit()
  assert StoreWriter(str(tmp_path / "t"), meta=dict(data="b")).done == 0


def test_store_checks_its_files_and_keeps_images(tmp_path):
  d = str(tmp_path / "s")
  pairs = [(ids, m, ("a.png",) * (k % 3)) for k, (ids, m) in enumerate(synthetic(9, seed=4))]
  ds = build_store(d, pairs, meta={})
  mem = SequenceDataset.from_pairs(pairs)
  assert ds.images == mem.images and ds.max_images == 2 and ds.fingerprint() == mem.fingerprint()
  ds.close()
  with open(os.path.join(d, "input_ids.i32"), "ab") as f:
    f.truncate(8)
  with pytest.raises(StoreError, match="input_ids.i32 has 8 bytes"):
    open_store(d)
  with pytest.raises(ValueError, match="loss_mask must hold only 0 and 1"):
    build_store(str(tmp_path / "bad"), [(np.arange(3), np.array([0, 2, 1]))])


def test_store_sequences_is_named_by_content_and_reused(tmp_path):
  from vsd_jax.data.sequence_store import store_sequences
  pairs = list(synthetic(12, seed=5))
  first = store_sequences(str(tmp_path), pairs, builder="t")
  assert os.listdir(tmp_path) == [f"sequences-{first.fingerprint()}"]
  added = []
  orig = StoreWriter.add
  StoreWriter.add = lambda self, *a: added.append(1) or orig(self, *a)
  try:
    again = store_sequences(str(tmp_path), pairs, builder="t")
    other = store_sequences(str(tmp_path), pairs[1:], builder="t")
  finally:
    StoreWriter.add = orig
  assert again.fingerprint() == first.fingerprint() and len(added) == 11  # only the other content was written
  assert len(other) == 11 and len(os.listdir(tmp_path)) == 2
  with pytest.raises(StoreError, match="nothing was published"):  # items that differ from the ones named
    build_store(str(tmp_path / "sequences-x"), pairs[:3], meta=dict(fingerprint="0" * 16))
  assert len(os.listdir(tmp_path)) == 2


KILLED_BUILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests.test_sequence_store import synthetic
from vsd_jax.data.sequence_store import build_store

def items():
  for n, p in enumerate(synthetic(50, seed=6)):
    if n == 25:  # 20 committed, 5 more written: stop here and wait to be killed
      open({ready!r}, "w").close()
      time.sleep(600)
    yield p

build_store({d!r}, items(), meta=dict(data="k"), commit_every=10)
"""


@pytest.mark.slow  # (a fresh interpreter importing vsd_jax.data, i.e. jax: ~5 s; the fast tier has the simulated kill)
def test_build_killed_with_sigkill_resumes_at_its_last_commit(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  d, ready = str(tmp_path / "s"), str(tmp_path / "ready")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD.format(root=root, ready=ready, d=d)])
  try:
    deadline = time.time() + 120
    while not os.path.exists(ready) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert os.path.exists(ready), "the build did not reach its 25th sequence"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with pytest.raises(StoreError, match="unfinished build"):
    open_store(d)
  added = []
  orig = StoreWriter.add
  StoreWriter.add = lambda self, *a: added.append(self.done) or orig(self, *a)
  try:
    ds = build_store(d, synthetic(50, seed=6), meta=dict(data="k"), commit_every=10)
  finally:
    StoreWriter.add = orig
  assert added == list(range(20, 50))
  assert ds.fingerprint() == SequenceDataset.from_pairs(list(synthetic(50, seed=6))).fingerprint()

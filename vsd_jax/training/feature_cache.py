"""Precomputed target outputs for EAGLE-3 training (config.train.target_features = "precomputed").

One pass of the target over the whole dataset writes, per token, what the EAGLE-3 loss reads: the fused
features [3H] and the SoftLabels (logits at the draft-vocabulary ids [N], the target's argmax and whether it
is in the draft vocabulary, the target's probability mass on the draft vocabulary) under <data cache>/features-<key>/.
Training steps then skip the target forward. The key hashes the dataset, the target and the draft vocabulary, so a
changed input never reuses stale features.

Layout: the tokens of each sequence one after another (no padding), in shards `shard-<p>-of-<n>/`, one per
process of the pass: `sequences.i64` (the dataset indices of the shard, in the order written), `offsets.i64` (each
one's first token), float16 `features.f16` [tokens, 3H] and `label_logits.f16` [tokens, N], int32 `target_top.i32`,
float32 `draft_mass.f32`, `done.u8` (one byte a sequence, set after its rows are written) and `complete.json` (the
shard is finished). `meta.json`, written last, lists the shards of a finished pass; the reader takes any layout, so
a cache written by many processes serves one and the reverse.

Several processes split the pass: sequences are sorted by length and dealt out in turn (even work per process);
each runs the target on its own devices (weights.local.process_local_target) over its shard, then all wait at a
barrier and open every shard. A killed pass resumes: finished shards are kept and a shard in progress continues
after its last finished batch. The size (sequences x tokens x 3 x hidden x 2 bytes for the features, plus the
labels) is logged before the pass starts, and a cache directory with less free space is refused
(FeatureCacheSpaceError), naming the in-step alternative.

Which mode is faster depends on how often each sequence is seen: the pass costs one target forward per
sequence, a step in "in_step" mode costs one per sequence of the batch (docs/RESULTS.md measures both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from vsd_jax.data.dataset import SequenceDataset, bucket_lengths, pad_batch, pick_bucket
from vsd_jax.errors import UserError
from vsd_jax.methods.eagle3.loss import soft_labels
from vsd_jax.models.features import target_pass

log = logging.getLogger(__name__)

MODES = ("in_step", "precomputed")
FORMAT = "v3: packed shards of features, label_logits, target_top, draft_mass"  # in the key: another layout is rebuilt
ARRAYS = (("features", "features.f16", np.float16), ("label_logits", "label_logits.f16", np.float16),
          ("target_top", "target_top.i32", np.int32), ("draft_mass", "draft_mass.f32", np.float32))


class FeatureCacheSpaceError(UserError):
  """The precomputed features would not fit in the free space of the cache directory."""


class FeatureCacheError(UserError):
  """A shard of the feature pass is missing or unfinished after every process finished its share."""


def shard_name(index: int, count: int) -> str:
  return f"shard-{index}-of-{count}"


def shard_sequences(lengths: np.ndarray, index: int, count: int) -> np.ndarray:
  """The dataset indices process `index` of `count` computes, longest first: the sequences sorted by length
  (ties by index) and dealt out in turn, so each process gets about the same number of tokens."""
  order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths, np.int64)))
  return order[index::count].astype(np.int64)


def feature_bytes(num_sequences: int, num_tokens: int, hidden: int, draft_vocab: int) -> dict:
  """Bytes the pass writes: per token 3 x hidden float16 features, draft_vocab float16 label logits, int32
  target_top and float32 draft_mass."""
  out = dict(features=num_tokens * 3 * hidden * 2, label_logits=num_tokens * draft_vocab * 2,
             target_top=num_tokens * 4, draft_mass=num_tokens * 4)
  out["total"] = sum(out.values())
  return out


def _gib(n: int) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


def _allocated(directory: str) -> int:
  """Bytes already on disk under `directory` (sparse files count what they hold)."""
  total = 0
  for root, _, files in os.walk(directory):
    for f in files:
      try:
        total += os.stat(os.path.join(root, f)).st_blocks * 512
      except OSError:
        pass
  return total


def check_space(directory: str, sizes: dict, description: str) -> None:
  """Raise FeatureCacheSpaceError when the file system of `directory` has less free space than what the pass
  still has to write (sizes["total"] less what is already there)."""
  probe = directory
  while not os.path.exists(probe):
    probe = os.path.dirname(os.path.abspath(probe))
  free = shutil.disk_usage(probe).free
  need = max(0, sizes["total"] - (_allocated(directory) if os.path.isdir(directory) else 0))
  if free < need:
    raise FeatureCacheSpaceError(
        f"the precomputed target features need {_gib(need)} more in {directory} ({description}), but its file "
        f"system has {_gib(free)} free. Free space or point --config.data.cache_dir at a larger disk, or compute "
        "the target's outputs in each training step instead: --config.train.target_features=in_step (no files; "
        "one target forward per sequence of each batch).")


class FeatureCache:
  """Read side of a finished pass: per sequence its rows of float16 features [L, 3H] and label_logits [L, N],
  int32 target_top [L] and float32 draft_mass [L], from whichever shard holds it."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)
    n = self.meta["sequences"]
    self.shard_of = np.full(n, -1, np.int32)
    self.start_of = np.zeros(n, np.int64)
    self.length_of = np.zeros(n, np.int64)
    self.shards = []
    width = dict(features=self.meta["feature_dim"], label_logits=self.meta["draft_vocab"])
    for s, name in enumerate(self.meta["shards"]):
      path = os.path.join(directory, name)
      seqs = np.fromfile(os.path.join(path, "sequences.i64"), np.int64)
      offsets = np.fromfile(os.path.join(path, "offsets.i64"), np.int64)
      tokens = int(offsets[-1])
      arrays = {}
      for key, fname, dtype in ARRAYS:
        shape = (tokens, width[key]) if key in width else (tokens,)
        arrays[key] = np.memmap(os.path.join(path, fname), dtype, "r", shape=shape) if tokens else \
            np.zeros(shape, dtype)
      self.shards.append(arrays)
      self.shard_of[seqs], self.start_of[seqs], self.length_of[seqs] = s, offsets[:-1], np.diff(offsets)
    if (self.shard_of < 0).any():
      raise FeatureCacheError(f"{directory}: {int((self.shard_of < 0).sum())} sequences are in no shard; delete "
                              "the directory to recompute the features")

  def sequence(self, i: int) -> dict:
    """The cached arrays of sequence i, each [length, ...]."""
    a, start = self.shards[self.shard_of[i]], self.start_of[i]
    return {k: np.asarray(v[start:start + self.length_of[i]]) for k, v in a.items()}

  def add_to(self, batch: dict, t2d: np.ndarray) -> dict:
    """A batch from iterate_batches(with_index=True) -> the same batch plus the cached arrays, cropped to T."""
    idx = batch["index"]
    b, t = batch["input_ids"].shape
    fdim, n = self.meta["feature_dim"], self.meta["draft_vocab"]
    feats, labels = np.zeros((b, t, fdim), np.float32), np.zeros((b, t, n), np.float32)
    top, mass = np.zeros((b, t), np.int32), np.zeros((b, t), np.float32)
    keep = np.zeros((b, t), bool)
    for row, i in enumerate(idx):  # zero for pad rows and past each sequence's end
      if i < 0:
        continue
      a, start = self.shards[self.shard_of[i]], self.start_of[i]
      length = min(int(self.length_of[i]), t)
      rows = slice(start, start + length)
      feats[row, :length], labels[row, :length] = a["features"][rows], a["label_logits"][rows]
      top[row, :length], mass[row, :length] = a["target_top"][rows], a["draft_mass"][rows]
      keep[row, :length] = True
    out = {k: v for k, v in batch.items() if k != "index"}
    out.update(features=feats, label_logits=labels, target_top=top, top_in_draft=(t2d[top] & keep).astype(np.int32),
               draft_mass=mass)
    return out


def cache_key(dataset: SequenceDataset, model_id: str, d2t: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(FORMAT.encode())
  h.update(dataset.fingerprint().encode())
  h.update(model_id.encode())
  h.update(np.asarray(d2t, np.int32).tobytes())
  return h.hexdigest()[:16]


def build_feature_cache(target, dataset: SequenceDataset, d2t: np.ndarray, t2d: np.ndarray, directory: str,
                        batch_size: int, buckets: tuple, pixels=None, config=None, process_index: Optional[int] = None,
                        process_count: Optional[int] = None, barrier: Optional[Callable] = None) -> FeatureCache:
  """Run the target over every sequence once (or reuse a finished pass in `directory`, or resume one that was
  killed). pixels: the PixelLoader of a multimodal dataset (its images go into the target's pass, as in the in-step
  mode). process_index / process_count (default: this JAX process of all): compute only this process's shard,
  with the target on this process's devices (a copy loaded with config's dtypes and mesh axes when the target is
  spread across processes), then `barrier()` (default parallel.process_barrier) and open every shard."""
  meta_path = os.path.join(directory, "meta.json")
  if os.path.isfile(meta_path):
    return FeatureCache(directory)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  cfg = target.config
  lengths = np.asarray(dataset.lengths, np.int64)
  fdim, n = 3 * cfg.hidden_size, int(d2t.shape[0])
  sizes = feature_bytes(len(lengths), int(lengths.sum()), cfg.hidden_size, n)
  description = (f"{len(lengths)} sequences, {int(lengths.sum())} tokens x 3 x {cfg.hidden_size} hidden x 2 bytes = "
                 f"{_gib(sizes['features'])} of features + {_gib(sizes['label_logits'])} of label logits ({n} "
                 f"draft-vocabulary ids x 2 bytes a token) + {_gib(sizes['target_top'] + sizes['draft_mass'])} of "
                 f"target ids and mass = {_gib(sizes['total'])}")
  log.info("precomputed target features: %s, in %s%s", description, directory,
           f" ({count} shards, this process computes shard {index})" if count > 1 else "")
  check_space(directory, sizes, description)
  os.makedirs(directory, exist_ok=True)
  _compute_shard(target, dataset, d2t, t2d, os.path.join(directory, shard_name(index, count)),
                 shard_sequences(lengths, index, count), batch_size, buckets, pixels, config, fdim, n)
  if count > 1:
    if barrier is None:
      from vsd_jax import parallel
      barrier = lambda: parallel.process_barrier("features")  # noqa: E731
    barrier()
  names = [shard_name(p, count) for p in range(count)]
  unfinished = [m for m in names if not os.path.isfile(os.path.join(directory, m, "complete.json"))]
  if unfinished:
    raise FeatureCacheError(
        f"feature shards {', '.join(unfinished)} in {directory} are not finished after every process finished its "
        "share. Did a process fail? data.cache_dir must be one directory shared by every process; rerun to "
        "compute only what is missing.")
  meta = dict(format=FORMAT, sequences=len(lengths), tokens=int(lengths.sum()), feature_dim=fdim, draft_vocab=n,
              shards=names)
  tmp = f"{meta_path}.{os.getpid()}-{index}.tmp"
  with open(tmp, "w") as f:  # every process writes the same file; the rename makes it appear whole
    json.dump(meta, f)
  os.replace(tmp, meta_path)
  return FeatureCache(directory)


def _compute_shard(target, dataset, d2t, t2d, path: str, seqs: np.ndarray, batch_size: int, buckets, pixels,
                   config, fdim: int, n: int) -> None:
  """Write the features of the dataset rows `seqs` into the shard directory `path`, after the batches a
  killed run of the same shard finished (done.u8)."""
  if os.path.isfile(os.path.join(path, "complete.json")):
    return
  lengths = np.asarray(dataset.lengths, np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths[seqs])]).astype(np.int64)
  tokens = int(offsets[-1])
  width = dict(features=fdim, label_logits=n)
  row_bytes = {k: np.dtype(dt).itemsize * width.get(k, 1) for k, _, dt in ARRAYS}
  os.makedirs(path, exist_ok=True)
  same = os.path.isfile(os.path.join(path, "sequences.i64")) and \
      np.array_equal(np.fromfile(os.path.join(path, "sequences.i64"), np.int64), seqs) and \
      os.path.isfile(os.path.join(path, "done.u8")) and os.path.getsize(os.path.join(path, "done.u8")) == len(seqs)
  if not same:  # a new shard (or one of another layout): start it empty
    for k, fname, _ in ARRAYS:
      with open(os.path.join(path, fname), "wb") as f:
        f.truncate(tokens * row_bytes[k])
    with open(os.path.join(path, "done.u8"), "wb") as f:
      f.truncate(len(seqs))
    offsets.tofile(os.path.join(path, "offsets.i64"))
    seqs.tofile(os.path.join(path, "sequences.i64"))  # last: a shard whose index is whole is resumed
  done = np.fromfile(os.path.join(path, "done.u8"), np.uint8).astype(bool)
  todo = np.flatnonzero(~done)
  if len(todo):
    log.info("target features %s: %d of %d sequences done, %d to compute", path, int(done.sum()), len(seqs),
             len(todo))
    _run_target(target, dataset, d2t, t2d, path, seqs, offsets, todo, batch_size, buckets, pixels, config,
                row_bytes)
  with open(os.path.join(path, "complete.json"), "w") as f:
    json.dump(dict(sequences=len(seqs), tokens=tokens), f)


def _run_target(target, dataset, d2t, t2d, path, seqs, offsets, todo, batch_size, buckets, pixels, config,
                row_bytes) -> None:
  from vsd_jax.weights.local import is_process_local, process_local_target

  if jax.process_count() > 1 and not is_process_local(target.params):
    if config is None:
      raise ValueError("build_feature_cache: the target is spread across processes; pass config (its model dtypes "
                       "and mesh axes) so each process loads its own copy")
    target = process_local_target(target, config)
  lengths = np.asarray(dataset.lengths, np.int64)
  buckets = tuple(buckets) if buckets else bucket_lengths(int(lengths.max()))
  d2t_j, t2d_j = jax.numpy.asarray(d2t), jax.numpy.asarray(t2d)

  @jax.jit
  def run(params, ids, valid, pixel_values=None):
    out = target_pass(target.model, params, ids, valid, pixel_values=pixel_values)
    lab = soft_labels(out.logits, t2d_j, d2t_j)
    return out.features.astype(np.float16), lab.draft_logits.astype(np.float16), lab.target_top, lab.draft_mass

  files = {k: os.open(os.path.join(path, fname), os.O_WRONLY) for k, fname, _ in ARRAYS}
  done_fd = os.open(os.path.join(path, "done.u8"), os.O_WRONLY)
  try:
    for b0 in range(0, len(todo), batch_size):
      chunk = todo[b0:b0 + batch_size]  # positions in the shard
      rows = np.full(batch_size, -1, np.int64)  # a static batch shape: pad rows (-1) fill the last batch
      rows[:len(chunk)] = seqs[chunk]
      batch = pad_batch(dataset, rows, pick_bucket(int(lengths[seqs[chunk]].max()), buckets), 0, pixels)
      out = jax.device_get(run(target.params, batch["input_ids"], batch["attention_mask"].astype(bool),
                               batch.get("pixel_values")))
      for row, j in enumerate(chunk):
        length = int(lengths[seqs[j]])
        for (k, _, dtype), a in zip(ARRAYS, out):
          os.pwrite(files[k], np.ascontiguousarray(a[row, :length], dtype).tobytes(), int(offsets[j]) * row_bytes[k])
      for j in chunk:  # after the rows: a sequence marked done has all of them in the files
        os.pwrite(done_fd, b"\x01", int(j))
      done = b0 + len(chunk)
      if done % (batch_size * 10) < batch_size or done == len(todo):
        log.info("target features: %d / %d sequences of %s", done, len(todo), path)
  finally:
    for fd in list(files.values()) + [done_fd]:
      os.close(fd)


def with_cached_targets(batches: Iterator[dict], cache: FeatureCache, t2d: np.ndarray) -> Iterator[dict]:
  for b in batches:
    yield cache.add_to(b, np.asarray(t2d, bool))

"""Training sequences and padded batches with static, bucketed lengths.

A SequenceDataset keeps its sequences as flat arrays, whether in memory or in a sequence store on disk
(data.sequence_store: written once, resumably, and read by every process): input_ids int32 [total tokens],
loss_mask uint8 [total tokens] (1 on response tokens) and offsets int64 [N + 1] (sequence i is
[offsets[i], offsets[i + 1])). A stored dataset holds only offsets and lengths in memory and reads the rows of
each batch from its files, so memory does not grow with the number of sequences.

A batch is a dict of numpy arrays: input_ids int32 [B, T], loss_mask int32 [B, T] (1 on response tokens)
and attention_mask int32 [B, T] (1 on real tokens, 0 on right padding). T is the smallest bucket that
holds the global batch's longest sequence, so a train step compiles once per bucket. A multimodal dataset (images
per sequence) batched with a `data.images.PixelLoader` adds pixel_values float32 [B, I, C, S, S] (row b's images,
blank after its count; I = the loader's max_images, static). With several processes each builds only its own
rows of the global batch (iterate_batches' process_index / process_count) and reads only those sequences.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from vsd_jax.errors import UserError


class SequenceRows:
  """Sequence view of one of a dataset's flat arrays: rows[i] -> int32 [T_i]; len, iteration and slices."""

  def __init__(self, dataset: "SequenceDataset", name: str):
    self._ds, self._name = dataset, name

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"sequence {i} of a dataset of {len(self)}")
    return self._ds.read(self._name, i % len(self))

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


class SequenceDataset:
  """Sequences with loss masks (and, multimodal, image files per sequence) as flat arrays.

  SequenceDataset(input_ids, loss_mask[, images]): per sequence i input_ids[i] int [T_i] and loss_mask[i] 0/1 [T_i]
  (held in memory); data.sequence_store.open_store(directory): a finished sequence store, read from
  its files. Either way dataset.input_ids[i] / dataset.loss_mask[i] are int32 [T_i] and images[i] is the tuple of
  image files of its prompt (in the order of its image-token runs; () for text), or images is None."""

  def __init__(self, input_ids: Sequence, loss_mask: Sequence, images: Optional[Sequence] = None):
    if len(input_ids) != len(loss_mask):
      raise ValueError(f"{len(input_ids)} input_ids but {len(loss_mask)} loss masks")
    ids = [np.asarray(x) for x in input_ids]
    masks = [np.asarray(m) for m in loss_mask]
    for i, (x, m) in enumerate(zip(ids, masks)):
      check_sequence(i, x, m)
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    self._init(np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32),
               np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8), offsets, images)

  def _init(self, tokens, mask, offsets, images, files=None, fingerprint=None):
    self._tokens, self._mask, self.offsets = tokens, mask, offsets
    self._files, self._fingerprint = files, fingerprint  # files: {"input_ids": fd, "loss_mask": fd} of a store
    self.lengths = np.diff(offsets).astype(np.int32)  # int32 [N]
    if images is not None:
      if len(images) != len(self):
        raise ValueError(f"{len(self)} sequences but {len(images)} image lists")
      images = [tuple(x) for x in images]
    self.images = images

  @classmethod
  def from_flat(cls, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, images=None, files=None,
                fingerprint: Optional[str] = None) -> "SequenceDataset":
    """From flat arrays (or, with `files`, open file descriptors of them: see data.sequence_store)."""
    ds = cls.__new__(cls)
    ds._init(tokens, mask, np.asarray(offsets, np.int64), images, files, fingerprint)
    return ds

  @classmethod
  def from_pairs(cls, pairs: Sequence[tuple]) -> "SequenceDataset":
    """(input_ids, loss_mask) pairs, or (input_ids, loss_mask, images) triples (a multimodal dataset)."""
    images = [tuple(p[2]) for p in pairs] if pairs and len(pairs[0]) > 2 else None
    return cls([p[0] for p in pairs], [p[1] for p in pairs], images)

  @property
  def stored(self) -> bool:
    """True when read from a sequence store's files (not held in memory)."""
    return self._files is not None

  @property
  def input_ids(self) -> SequenceRows:
    return SequenceRows(self, "input_ids")

  @property
  def loss_mask(self) -> SequenceRows:
    return SequenceRows(self, "loss_mask")

  def read(self, name: str, i: int) -> np.ndarray:
    """Sequence i of "input_ids" or "loss_mask" -> int32 [T_i] (a store's: read from its file, not mapped, so
    what an epoch reads does not stay resident in this process)."""
    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
    if self._files is None:
      return (self._tokens if name == "input_ids" else self._mask)[a:b].astype(np.int32)
    dtype = np.dtype(np.int32 if name == "input_ids" else np.uint8)
    raw = os.pread(self._files[name], (b - a) * dtype.itemsize, a * dtype.itemsize)
    if len(raw) != (b - a) * dtype.itemsize:
      raise OSError(f"sequence store: {name} of sequence {i} is cut short (the store's files changed after it was "
                    "opened?)")
    return np.frombuffer(raw, dtype).astype(np.int32)

  def close(self) -> None:
    """Close a store's files (a stored dataset is unusable after this; nothing to do in memory)."""
    for fd in (self._files or {}).values():
      os.close(fd)
    self._files = {} if self._files is not None else None

  def __del__(self):
    try:
      self.close()
    except Exception:  # (at interpreter exit os may already be gone; the files close with the process)
      pass

  def read_into(self, i: int, ids_out: np.ndarray, mask_out: np.ndarray) -> int:
    """Sequence i into ids_out[:T_i] (int32, C-contiguous) and mask_out[:T_i]; returns T_i. A store's tokens are
    read straight into ids_out (no intermediate copy)."""
    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
    n = b - a
    if self._files is None:
      ids_out[:n], mask_out[:n] = self._tokens[a:b], self._mask[a:b]
      return n
    got = os.preadv(self._files["input_ids"], [memoryview(ids_out[:n]).cast("B")], a * 4)
    mask = os.pread(self._files["loss_mask"], n, a)
    if got != n * 4 or len(mask) != n:
      raise OSError(f"sequence store: sequence {i} is cut short (the store's files changed after it was opened?)")
    mask_out[:n] = np.frombuffer(mask, np.uint8)
    return n

  @property
  def max_images(self) -> int:
    """Most images of one sequence (0 for a text dataset)."""
    return max((len(x) for x in self.images), default=0) if self.images is not None else 0

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> dict:
    out = {"input_ids": self.input_ids[i], "loss_mask": self.loss_mask[i]}
    if self.images is not None:
      out["images"] = self.images[i]
    return out

  def blocks(self, max_tokens: int = 1 << 24) -> Iterator[tuple]:
    """(first sequence, input_ids int32 [n], loss_mask uint8 [n], offsets int64 [k + 1] from 0) for runs of k whole
    sequences of about max_tokens tokens: a pass over every token with bounded memory."""
    start, n = 0, len(self)
    while start < n:
      stop = max(start + 1, int(np.searchsorted(self.offsets, self.offsets[start] + max_tokens, "right")) - 1)
      stop = min(stop, n)
      a, b = int(self.offsets[start]), int(self.offsets[stop])
      if self._files is None:
        ids, mask = self._tokens[a:b], self._mask[a:b]
      else:
        ids = np.frombuffer(os.pread(self._files["input_ids"], (b - a) * 4, a * 4), np.int32)
        mask = np.frombuffer(os.pread(self._files["loss_mask"], b - a, a), np.uint8)
      yield start, ids, mask, self.offsets[start:stop + 1] - a
      start = stop

  def num_loss_tokens(self) -> int:
    return int(sum(int(m.sum(dtype=np.int64)) for _, _, m, _ in self.blocks()))

  def fingerprint(self) -> str:
    """Content hash of every sequence and mask (keys caches derived from the data, e.g. the draft vocab); a store
    keeps the one computed when it was written."""
    if self._fingerprint is None:
      h = Fingerprint()
      for _, ids, mask, offs in self.blocks():
        for j in range(len(offs) - 1):
          h.add(ids[offs[j]:offs[j + 1]], mask[offs[j]:offs[j + 1]])
      self._fingerprint = h.hexdigest(self.images)
    return self._fingerprint

  def save(self, path: str) -> None:
    """One .npz: concatenated ids/masks plus lengths."""
    extra = {} if self.images is None else {"images": np.asarray(json.dumps(self.images))}
    ids = np.concatenate([b[1] for b in self.blocks()]) if len(self) else np.zeros(0, np.int32)
    mask = np.concatenate([b[2] for b in self.blocks()]).astype(np.int32) if len(self) else np.zeros(0, np.int32)
    np.savez(path, input_ids=ids, loss_mask=mask, lengths=self.lengths, **extra)

  @classmethod
  def load(cls, path: str) -> "SequenceDataset":
    with np.load(path) as z:
      lengths = z["lengths"]
      offsets = np.zeros(len(lengths) + 1, np.int64)
      np.cumsum(lengths, out=offsets[1:])
      images = json.loads(str(z["images"])) if "images" in z.files else None
      mask = z["loss_mask"]
      check_sequence("(all)", z["input_ids"], mask)
      return cls.from_flat(z["input_ids"].astype(np.int32), mask.astype(np.uint8), offsets, images)


INT32_MAX = int(np.iinfo(np.int32).max)


def check_sequence(i, ids: np.ndarray, mask: np.ndarray) -> None:
  """ValueError naming sequence i unless ids and mask are equal 1-D shapes of integers, the mask 0/1."""
  if ids.shape != mask.shape or ids.ndim != 1:
    raise ValueError(f"sequence {i}: input_ids {ids.shape} and loss_mask {mask.shape} must be equal 1-D shapes")
  if ids.size and (ids.dtype.kind not in "iub" or ids.min() < 0 or ids.max() > INT32_MAX):
    raise ValueError(f"sequence {i}: input_ids must be token ids in [0, 2**31) (got {ids.dtype}, "
                     f"{ids.min()}..{ids.max()})")
  if mask.size and (mask.min() < 0 or mask.max() > 1 or (mask.dtype.kind not in "iub" and
                                                         ((mask != 0) & (mask != 1)).any())):
    raise ValueError(f"sequence {i}: loss_mask must hold only 0 and 1")


class Fingerprint:
  """The content hash of SequenceDataset.fingerprint, fed one sequence at a time (for stores written in a stream):
  per sequence its length (int64), ids (int32) and mask (int32) bytes; then the image files, if any."""

  def __init__(self):
    self._h = hashlib.sha256()

  def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
    self._h.update(np.int64(len(ids)).tobytes())
    self._h.update(np.asarray(ids, np.int32).tobytes())
    self._h.update(np.asarray(mask, np.int32).tobytes())

  def hexdigest(self, images: Optional[Sequence] = None) -> str:
    h = self._h.copy()
    if images is not None:  # a text dataset keeps its fingerprint
      from vsd_jax.data.images import image_identity
      h.update(json.dumps([[image_identity(p) for p in x] for x in images]).encode())
    return h.hexdigest()[:16]


def bucket_lengths(max_length: int, min_length: int = 64) -> tuple:
  """Powers of two from min_length, capped by (and ending with) max_length: few compiled shapes."""
  out, t = [], min_length
  while t < max_length:
    out.append(t)
    t *= 2
  return tuple(out) + (max_length,)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}; apply the length "
                   "limit (data.max_length) before batching.")


def pad_batch(dataset: SequenceDataset, indices: Sequence[int], length: int, pad_id: int = 0,
              pixels=None) -> dict:
  """Right-pad the given sequences to `length` -> dict of int32 [len(indices), length] arrays (an index of -1 is a
  pad row: no tokens, blank images); with `pixels` (a data.images.PixelLoader) and a multimodal dataset also
  pixel_values float32 [len(indices), I, C, S, S]."""
  b = len(indices)
  ids = np.full((b, length), pad_id, np.int32)
  loss = np.zeros((b, length), np.int32)
  attn = np.zeros((b, length), np.int32)
  for row, i in enumerate(indices):
    if i >= 0:
      attn[row, :dataset.read_into(i, ids[row], loss[row])] = 1
  out = {"input_ids": ids, "loss_mask": loss, "attention_mask": attn}
  if pixels is not None and dataset.images is not None:
    out["pixel_values"] = pixels.batch([dataset.images[i] if i >= 0 else () for i in indices])
  return out


def full_batches(num_sequences: int, batch_size: int, name: str = "batch_size") -> int:
  """Full batches of `batch_size` in an epoch of `num_sequences` (the last partial batch dropped); a UserError
  naming `name` (the setting, e.g. "train.batch_size") when there is none."""
  if batch_size < 1:
    raise UserError(f"{name}={batch_size}: must be >= 1 sequences per batch")
  if num_sequences < batch_size:
    raise UserError(f"{name}={batch_size} is larger than the {num_sequences} training sequences, so an epoch has no "
                    f"full batch; lower {name} to at most {num_sequences} or add prompts (config.data.sources)")
  return num_sequences // batch_size


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int = 0, drop_last: bool = True,
                  sort_window: int = 0) -> list:
  """The epoch's batches as dataset indices: a list of int64 [<= batch_size] arrays, in the order they are visited;
  deterministic given (seed, epoch) and the sequence lengths (int [N]) alone.

  The order is a permutation by np.random.default_rng([seed, epoch]); sort_window > 0 sorts each window of that many
  shuffled sequences by length (stable), and the batches are then visited in an order drawn from the same rng."""
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  if sort_window > 0:
    order = np.concatenate([w[np.argsort(lengths[w], kind="stable")]
                            for w in (order[s:s + sort_window] for s in range(0, len(order), sort_window))])
  stop = len(order) - len(order) % batch_size if drop_last else len(order)
  groups = [order[s:s + batch_size] for s in range(0, stop, batch_size)]
  if sort_window > 0:  # batches of similar lengths, visited in random order
    groups = [groups[j] for j in rng.permutation(len(groups))]
  return groups


def iterate_batches(dataset: SequenceDataset, batch_size: int, seed: int, epoch: int = 0,
                    buckets: Optional[Sequence[int]] = None, pad_id: int = 0, drop_last: bool = True,
                    sort_window: int = 0, with_index: bool = False, pixels=None, start: int = 0,
                    process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Shuffled, padded batches; deterministic given (seed, epoch) (see epoch_batches).

  buckets: allowed T values (default bucket_lengths(longest sequence)). drop_last keeps B static by
  dropping the final partial batch (otherwise it is padded with all-zero-mask rows). sort_window > 0
  sorts each window of that many shuffled sequences by length before batching (and then shuffles the
  batch order), to cut padding. with_index adds "index": int32 [B], each row's dataset index (-1 = pad row).
  pixels: a data.images.PixelLoader; a multimodal dataset's batches then carry pixel_values [B, I, C, S, S].
  start: the epoch's first batch to yield (a resumed run; the ones before it are not read).
  process_index / process_count: yield only that process's rows of each global batch, rows
  [index * B / count, (index + 1) * B / count) (parallel.process_local_slice's layout), reading only those
  sequences; T is still the global batch's bucket, so every process pads to the same length.
  """
  if drop_last:
    full_batches(len(dataset), batch_size)
  elif len(dataset) == 0 or batch_size < 1:
    raise UserError(f"cannot batch {len(dataset)} sequences by batch_size={batch_size}; both must be >= 1")
  if process_count < 1 or not 0 <= process_index < process_count or batch_size % process_count:
    raise UserError(f"batch size {batch_size} cannot be split across {process_count} processes (process "
                    f"{process_index}); use a batch size that is a multiple of the process count")
  lengths = dataset.lengths
  buckets = tuple(buckets) if buckets else bucket_lengths(int(lengths.max()))
  rows = batch_size // process_count
  for idx in epoch_batches(lengths, batch_size, seed, epoch, drop_last, sort_window)[start:]:
    length = pick_bucket(int(lengths[idx].max()), buckets)
    full = np.full(batch_size, -1, np.int64)  # the global batch's rows; -1: pad rows of a last partial batch
    full[:len(idx)] = idx
    mine = full[process_index * rows:(process_index + 1) * rows]
    batch = pad_batch(dataset, mine, length, pad_id, pixels)
    if with_index:
      batch["index"] = mine.astype(np.int32)
    yield batch

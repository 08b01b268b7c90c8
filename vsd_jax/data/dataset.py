"""Training sequences and padded batches with static, bucketed lengths.

A batch is a dict of numpy arrays: input_ids int32 [B, T], loss_mask int32 [B, T] (1 on response tokens)
and attention_mask int32 [B, T] (1 on real tokens, 0 on right padding). T is the smallest bucket that
holds the batch's longest sequence, so a train step compiles once per bucket. A multimodal dataset (images per
sequence) batched with a `data.images.PixelLoader` adds pixel_values float32 [B, I, C, S, S] (row b's images,
blank after its count; I = the loader's max_images, static).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterator, Optional, Sequence

import numpy as np

from vsd_jax.errors import UserError


@dataclasses.dataclass
class SequenceDataset:
  """Per sequence i: input_ids[i] int32 [T_i] and loss_mask[i] int32 [T_i]; a multimodal dataset also
  images[i], the tuple of image files of its prompt (in the order of its image-token runs; () for text)."""
  input_ids: list
  loss_mask: list
  images: Optional[list] = None

  def __post_init__(self):
    if len(self.input_ids) != len(self.loss_mask):
      raise ValueError(f"{len(self.input_ids)} input_ids but {len(self.loss_mask)} loss masks")
    self.input_ids = [np.asarray(x, np.int32) for x in self.input_ids]
    self.loss_mask = [np.asarray(m, np.int32) for m in self.loss_mask]
    for i, (x, m) in enumerate(zip(self.input_ids, self.loss_mask)):
      if x.shape != m.shape or x.ndim != 1:
        raise ValueError(f"sequence {i}: input_ids {x.shape} and loss_mask {m.shape} must be equal 1-D shapes")
    if self.images is not None:
      if len(self.images) != len(self.input_ids):
        raise ValueError(f"{len(self.input_ids)} sequences but {len(self.images)} image lists")
      self.images = [tuple(x) for x in self.images]

  @classmethod
  def from_pairs(cls, pairs: Sequence[tuple]) -> "SequenceDataset":
    """(input_ids, loss_mask) pairs, or (input_ids, loss_mask, images) triples (a multimodal dataset)."""
    images = [tuple(p[2]) for p in pairs] if pairs and len(pairs[0]) > 2 else None
    return cls([p[0] for p in pairs], [p[1] for p in pairs], images)

  @property
  def max_images(self) -> int:
    """Most images of one sequence (0 for a text dataset)."""
    return max((len(x) for x in self.images), default=0) if self.images is not None else 0

  def __len__(self) -> int:
    return len(self.input_ids)

  def __getitem__(self, i: int) -> dict:
    out = {"input_ids": self.input_ids[i], "loss_mask": self.loss_mask[i]}
    if self.images is not None:
      out["images"] = self.images[i]
    return out

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(x) for x in self.input_ids], np.int32)

  def num_loss_tokens(self) -> int:
    return int(sum(int(m.sum()) for m in self.loss_mask))

  def fingerprint(self) -> str:
    """Content hash of every sequence and mask (keys caches derived from the data, e.g. the draft vocab)."""
    h = hashlib.sha256()
    for x, m in zip(self.input_ids, self.loss_mask):
      h.update(np.int64(len(x)).tobytes())
      h.update(x.tobytes())
      h.update(m.tobytes())
    if self.images is not None:  # a text dataset keeps its fingerprint
      from vsd_jax.data.images import image_identity
      h.update(json.dumps([[image_identity(p) for p in x] for x in self.images]).encode())
    return h.hexdigest()[:16]

  def save(self, path: str) -> None:
    """One .npz: concatenated ids/masks plus lengths."""
    extra = {} if self.images is None else {"images": np.asarray(json.dumps(self.images))}
    np.savez(path, input_ids=np.concatenate(self.input_ids) if self.input_ids else np.zeros(0, np.int32),
             loss_mask=np.concatenate(self.loss_mask) if self.loss_mask else np.zeros(0, np.int32),
             lengths=self.lengths, **extra)

  @classmethod
  def load(cls, path: str) -> "SequenceDataset":
    with np.load(path) as z:
      cuts = np.cumsum(z["lengths"])[:-1]
      images = json.loads(str(z["images"])) if "images" in z.files else None
      return cls(list(np.split(z["input_ids"], cuts)) if len(z["lengths"]) else [],
                 list(np.split(z["loss_mask"], cuts)) if len(z["lengths"]) else [], images)


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
  """Right-pad the given sequences to `length` -> dict of int32 [len(indices), length] arrays; with `pixels` (a
  data.images.PixelLoader) and a multimodal dataset also pixel_values float32 [len(indices), I, C, S, S]."""
  b = len(indices)
  ids = np.full((b, length), pad_id, np.int32)
  loss = np.zeros((b, length), np.int32)
  attn = np.zeros((b, length), np.int32)
  for row, i in enumerate(indices):
    n = len(dataset.input_ids[i])
    ids[row, :n] = dataset.input_ids[i]
    loss[row, :n] = dataset.loss_mask[i]
    attn[row, :n] = 1
  out = {"input_ids": ids, "loss_mask": loss, "attention_mask": attn}
  if pixels is not None and dataset.images is not None:
    out["pixel_values"] = pixels.batch([dataset.images[i] for i in indices])
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


def iterate_batches(dataset: SequenceDataset, batch_size: int, seed: int, epoch: int = 0,
                    buckets: Optional[Sequence[int]] = None, pad_id: int = 0, drop_last: bool = True,
                    sort_window: int = 0, with_index: bool = False, pixels=None) -> Iterator[dict]:
  """Shuffled, padded batches; deterministic given (seed, epoch).

  buckets: allowed T values (default bucket_lengths(longest sequence)). drop_last keeps B static by
  dropping the final partial batch (otherwise it is padded with all-zero-mask rows). sort_window > 0
  sorts each window of that many shuffled sequences by length before batching (and then shuffles the
  batch order), to cut padding. with_index adds "index": int32 [B], each row's dataset index (-1 = pad row).
  pixels: a data.images.PixelLoader; a multimodal dataset's batches then carry pixel_values [B, I, C, S, S].
  """
  if drop_last:
    full_batches(len(dataset), batch_size)
  elif len(dataset) == 0 or batch_size < 1:
    raise UserError(f"cannot batch {len(dataset)} sequences by batch_size={batch_size}; both must be >= 1")
  buckets = tuple(buckets) if buckets else bucket_lengths(int(dataset.lengths.max()))
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(dataset))
  if sort_window > 0:
    lengths = dataset.lengths
    order = np.concatenate([sorted(order[s:s + sort_window], key=lambda i: lengths[i])
                            for s in range(0, len(order), sort_window)])
  stop = len(order) - len(order) % batch_size if drop_last else len(order)
  groups = [[int(i) for i in order[s:s + batch_size]] for s in range(0, stop, batch_size)]
  if sort_window > 0:  # batches of similar lengths, visited in random order
    groups = [groups[j] for j in rng.permutation(len(groups))]
  for idx in groups:
    length = pick_bucket(max(len(dataset.input_ids[i]) for i in idx), buckets)
    batch = pad_batch(dataset, idx, length, pad_id, pixels)
    if len(idx) < batch_size:  # last partial batch: pad rows carry no tokens (and blank images)
      extra = batch_size - len(idx)
      batch = {k: np.concatenate([v, np.full((extra,) + v.shape[1:], pad_id if k == "input_ids" else 0, v.dtype)])
               for k, v in batch.items()}
    if with_index:
      batch["index"] = np.asarray(idx + [-1] * (batch_size - len(idx)), np.int32)
    yield batch

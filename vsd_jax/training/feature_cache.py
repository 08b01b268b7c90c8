"""Precomputed target outputs for EAGLE-3 training (config.train.target_features = "precomputed").

One pass of the target over the whole dataset writes, per token, what the EAGLE-3 loss reads: the fused
features [3H] and the SoftLabels (logits at the draft-vocabulary ids [N], the target's argmax and whether it
is in the draft vocabulary, the target's probability mass on the draft vocabulary), in float16 memory-mapped files under <data cache>/features-<key>/. Training
steps then skip the target forward. The key hashes the dataset, the target and the draft vocabulary, so a
changed input never reuses stale features; a pass that did not finish is redone.

Which mode is faster depends on how often each sequence is seen: the pass costs one target forward per
sequence, a step in "in_step" mode costs one per sequence of the batch (docs/RESULTS.md measures both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator

import jax
import numpy as np

from vsd_jax.data.dataset import SequenceDataset, iterate_batches
from vsd_jax.methods.eagle3.loss import soft_labels
from vsd_jax.models.features import target_pass

MODES = ("in_step", "precomputed")
FORMAT = "v2: features, label_logits, target_top, draft_mass"   # in the key: a cache of another layout is rebuilt


class FeatureCache:
  """Read side: float16 memmaps features [S, L, 3H], label_logits [S, L, N]; int32 target_top [S, L];
  float32 draft_mass [S, L]."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, "meta.json")) as f:
      self.meta = json.load(f)
    shape = (self.meta["sequences"], self.meta["max_length"])
    self.features = np.memmap(os.path.join(directory, "features.f16"), np.float16, "r",
                              shape=shape + (self.meta["feature_dim"],))
    self.label_logits = np.memmap(os.path.join(directory, "label_logits.f16"), np.float16, "r",
                                  shape=shape + (self.meta["draft_vocab"],))
    self.target_top = np.memmap(os.path.join(directory, "target_top.i32"), np.int32, "r", shape=shape)
    self.draft_mass = np.memmap(os.path.join(directory, "draft_mass.f32"), np.float32, "r", shape=shape)

  def add_to(self, batch: dict, t2d: np.ndarray) -> dict:
    """A batch from iterate_batches(with_index=True) -> the same batch plus the cached arrays, cropped to T."""
    idx = batch["index"]
    t = batch["input_ids"].shape[1]
    rows = np.maximum(idx, 0)
    keep = (idx >= 0)[:, None]

    def rows_of(a):  # [B, T, ...]: the cached rows, zero for pad rows and past the longest sequence
      x = np.asarray(a[rows, :t])
      x = np.pad(x, [(0, 0), (0, t - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
      return np.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0)

    top = rows_of(self.target_top)
    out = {k: v for k, v in batch.items() if k != "index"}
    out.update(features=rows_of(self.features).astype(np.float32),
               label_logits=rows_of(self.label_logits).astype(np.float32),
               target_top=top.astype(np.int32), top_in_draft=(t2d[top] & keep).astype(np.int32),
               draft_mass=rows_of(self.draft_mass).astype(np.float32))
    return out


def cache_key(dataset: SequenceDataset, model_id: str, d2t: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(FORMAT.encode())
  h.update(dataset.fingerprint().encode())
  h.update(model_id.encode())
  h.update(np.asarray(d2t, np.int32).tobytes())
  return h.hexdigest()[:16]


def build_feature_cache(target, dataset: SequenceDataset, d2t: np.ndarray, t2d: np.ndarray, directory: str,
                        batch_size: int, buckets: tuple, pixels=None) -> FeatureCache:
  """Run the target over every sequence once (or reuse a finished pass in `directory`). pixels: the PixelLoader
  of a multimodal dataset (its images go into the target's pass, as in the in-step mode)."""
  meta_path = os.path.join(directory, "meta.json")
  if os.path.isfile(meta_path):
    return FeatureCache(directory)
  os.makedirs(directory, exist_ok=True)
  cfg = target.config
  shape = (len(dataset), int(max(dataset.lengths.max(), 1)))
  fdim, n = 3 * cfg.hidden_size, int(d2t.shape[0])
  feats = np.memmap(os.path.join(directory, "features.f16"), np.float16, "w+", shape=shape + (fdim,))
  labels = np.memmap(os.path.join(directory, "label_logits.f16"), np.float16, "w+", shape=shape + (n,))
  tops = np.memmap(os.path.join(directory, "target_top.i32"), np.int32, "w+", shape=shape)
  masses = np.memmap(os.path.join(directory, "draft_mass.f32"), np.float32, "w+", shape=shape)
  d2t_j, t2d_j = jax.numpy.asarray(d2t), jax.numpy.asarray(t2d)

  @jax.jit
  def run(params, ids, valid, pixel_values=None):
    out = target_pass(target.model, params, ids, valid, pixel_values=pixel_values)
    lab = soft_labels(out.logits, t2d_j, d2t_j)
    return out.features.astype(np.float16), lab.draft_logits.astype(np.float16), lab.target_top, lab.draft_mass

  done = 0
  for batch in iterate_batches(dataset, batch_size, seed=0, buckets=buckets, drop_last=False, with_index=True,
                               pixels=pixels):
    f, lab, top, mass = jax.device_get(run(target.params, batch["input_ids"], batch["attention_mask"].astype(bool),
                                     batch.get("pixel_values")))
    for row, i in enumerate(batch["index"]):
      if i < 0:
        continue
      length = len(dataset.input_ids[i])
      feats[i, :length], labels[i, :length], tops[i, :length] = f[row, :length], lab[row, :length], top[row, :length]
      masses[i, :length] = mass[row, :length]
      done += 1
    if done and done % (batch_size * 10) < batch_size:
      logging.info("target features: %d / %d sequences", done, len(dataset))
  for m in (feats, labels, tops, masses):
    m.flush()
  with open(meta_path, "w") as f:  # written last: its presence marks a finished pass
    json.dump(dict(sequences=shape[0], max_length=shape[1], feature_dim=fdim, draft_vocab=n), f)
  return FeatureCache(directory)


def with_cached_targets(batches: Iterator[dict], cache: FeatureCache, t2d: np.ndarray) -> Iterator[dict]:
  for b in batches:
    yield cache.add_to(b, np.asarray(t2d, bool))

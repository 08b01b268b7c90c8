"""Draft vocabulary: the N most frequent loss-masked (response) tokens, as EAGLE-3 defines it.

The chosen target ids are sorted ascending; draft index i stands for target id `i + d2t[i]` (d2t holds
offsets, as in EAGLE-3 checkpoints), and `t2d[v]` is True for target ids v in the draft vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
# jax.numpy is imported only when a map is given jax arrays: this module imports no JAX (dry_run uses it before JAX
# starts).

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DraftVocab:
  d2t: np.ndarray        # int32 [N]: target_id = i + d2t[i]
  t2d: np.ndarray        # bool [V]: target id is in the draft vocabulary
  counts: np.ndarray     # int64 [N]: loss-masked occurrences of each draft token in the data
  coverage: float        # fraction of loss-masked tokens whose id is in the draft vocabulary

  @property
  def size(self) -> int:
    return int(self.d2t.shape[0])

  @property
  def target_ids(self) -> np.ndarray:
    """int32 [N], ascending: the target id of each draft id."""
    return draft_vocab_ids(self.d2t)

  def save(self, path: str) -> None:
    np.savez(path, d2t=self.d2t, t2d=self.t2d, counts=self.counts, coverage=np.float64(self.coverage))

  @classmethod
  def load(cls, path: str) -> "DraftVocab":
    with np.load(path) as z:
      return cls(z["d2t"], z["t2d"], z["counts"], float(z["coverage"]))


def token_counts(dataset, vocab_size: int) -> np.ndarray:
  """int64 [V]: occurrences of each target id at loss-masked positions of a SequenceDataset."""
  counts = np.zeros(vocab_size, np.int64)
  for _, ids, mask, _ in dataset.blocks():  # runs of whole sequences, ~16M tokens each
    sel = ids[mask.astype(bool)]
    if sel.size and (sel.min() < 0 or sel.max() >= vocab_size):
      raise ValueError(f"token id {int(sel.max())} outside the target vocabulary [0, {vocab_size}); the data was "
                       "tokenised for another model.")
    counts += np.bincount(sel, minlength=vocab_size)
  return counts


def from_counts(counts: np.ndarray, draft_vocab_size: int) -> DraftVocab:
  """Top-N ids by count (ties: lower id first), sorted by target id. Ids never seen fill the remaining
  slots (lowest ids first) when fewer than N distinct tokens occur."""
  v = counts.shape[0]
  n = int(draft_vocab_size)
  if not 0 < n <= v:
    raise ValueError(f"draft vocab size {n} must be in [1, {v}] (the target vocabulary size); "
                     "set config.data.draft_vocab_size.")
  order = np.lexsort((np.arange(v), -counts))  # by count descending, then id ascending
  chosen = np.sort(order[:n]).astype(np.int32)
  seen = int((counts > 0).sum())
  if seen < n:
    log.warning("only %d distinct response tokens occur in the data; %d never-seen ids fill the draft vocab "
                "of %d (more prompts or a smaller data.draft_vocab_size would fit better)", seen, n - seen, n)
  t2d = np.zeros(v, bool)
  t2d[chosen] = True
  total = int(counts.sum())
  coverage = float(counts[chosen].sum() / total) if total else 0.0
  return DraftVocab(chosen - np.arange(n, dtype=np.int32), t2d, counts[chosen], coverage)


def build_draft_vocab(dataset, vocab_size: int, draft_vocab_size: int, cache_dir: Optional[str] = None) -> DraftVocab:
  """Draft vocab of a SequenceDataset, cached as draft_vocab-<data hash>-<N>.npz under cache_dir."""
  path = None
  if cache_dir:
    path = os.path.join(cache_dir, f"draft_vocab-{dataset.fingerprint()}-{vocab_size}-{draft_vocab_size}.npz")
    if os.path.exists(path):
      vocab = DraftVocab.load(path)
      log.info("draft vocab: %d tokens, coverage %.2f%% (cached %s)", vocab.size, 100 * vocab.coverage, path)
      return vocab
  vocab = from_counts(token_counts(dataset, vocab_size), draft_vocab_size)
  log.info("draft vocab: top %d of %d target tokens cover %.2f%% of %d response tokens", vocab.size, vocab_size,
           100 * vocab.coverage, dataset.num_loss_tokens())
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    vocab.save(tmp)
    os.replace(tmp, path)
  return vocab


def _xp(x):
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp
  return jnp


def draft_to_target(ids, d2t):
  """Draft indices [...] -> target ids [...]; numpy or jax arrays (jit-safe). The one draft -> target map."""
  return ids + d2t[ids]


def draft_vocab_ids(d2t):
  """int32 [N]: the target id of every draft id 0..N-1 (d2t: [N]); numpy or jax arrays (jit-safe)."""
  xp = _xp(d2t)
  return draft_to_target(xp.arange(d2t.shape[0], dtype=xp.int32), d2t.astype(xp.int32))


def target_to_draft(ids, t2d, missing: int = -1):
  """Target ids [...] -> draft indices [...]; ids outside the draft vocab map to `missing`.

  numpy or jax arrays (jit-safe); t2d: bool [V].
  """
  xp = _xp(t2d)
  index = xp.cumsum(t2d.astype(xp.int32)) - 1
  return xp.where(t2d[ids], index[ids], missing).astype(xp.int32)

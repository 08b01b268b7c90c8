"""Statistics over per-prompt results: ratios of pooled rates with paired bootstrap intervals."""

from __future__ import annotations

import numpy as np


def bootstrap_ratio(a_tokens, a_rounds, b_tokens, b_rounds, reps: int = 10000, seed: int = 0) -> tuple:
  """Ratio of tau (tokens/rounds pooled over prompts) of A over B on the same prompts, with a paired bootstrap
  95% interval over prompts: (ratio, low, high). Each argument: [P] per-prompt totals (averaged over seeds by the
  caller); prompt i of A and of B are resampled together."""
  a_t, a_r, b_t, b_r = (np.asarray(x, np.float64) for x in (a_tokens, a_rounds, b_tokens, b_rounds))
  if not a_t.shape == a_r.shape == b_t.shape == b_r.shape or a_t.ndim != 1 or not a_t.size:
    raise ValueError(f"bootstrap_ratio needs four [P] arrays of the same prompts, P >= 1; got shapes "
                     f"{a_t.shape}, {a_r.shape}, {b_t.shape}, {b_r.shape}")
  point = (a_t.sum() / a_r.sum()) / (b_t.sum() / b_r.sum())
  idx = np.random.default_rng(seed).integers(0, len(a_t), (reps, len(a_t)))
  boot = (a_t[idx].sum(1) / a_r[idx].sum(1)) / (b_t[idx].sum(1) / b_r[idx].sum(1))
  lo, hi = np.percentile(boot, [2.5, 97.5])
  return float(point), float(lo), float(hi)

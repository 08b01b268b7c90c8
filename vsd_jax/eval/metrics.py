"""Speculative-decoding metrics from per-prompt results: tau, per-depth acceptance (n-alpha), speed."""

from __future__ import annotations

import numpy as np

from vsd_jax.errors import UserError


def acceptance_by_depth(hist) -> list:
  """n-alpha: P(the draft token at depth k+1 is accepted | depths 1..k were), from rounds-by-accepted-count.

  hist: [D+1] counts of rounds that accepted m = 0..D draft tokens. Returns [D] rates (nan if unreached).
  """
  h = np.asarray(hist, np.float64)
  reached = np.cumsum(h[::-1])[::-1]          # reached[k] = rounds with m >= k
  out = []
  for k in range(len(h) - 1):
    out.append(float(reached[k + 1] / reached[k]) if reached[k] > 0 else float("nan"))
  return out


def summarize(vanilla: list, spec: list) -> dict:
  """Aggregate runner.Generation lists of the same prompts (B=1 each); at least one prompt."""
  if not spec or len(vanilla) != len(spec):
    raise UserError(f"no results to summarize ({len(vanilla)} vanilla, {len(spec)} speculative generations of "
                    "the same prompts are needed, at least one); evaluate at least one prompt (--num_prompts >= 1)")
  v_tokens = sum(g.new_tokens for g in vanilla)
  s_tokens = sum(g.new_tokens for g in spec)
  v_time = sum(g.wall_time for g in vanilla)
  s_time = sum(g.wall_time for g in spec)
  hist = np.sum([g.accept_hist for g in spec], axis=0)
  same = sum(a.output_ids == b.output_ids for a, b in zip(vanilla, spec))
  return dict(
      prompts=len(spec), tau=s_tokens / max(1, sum(g.rounds for g in spec)),
      accept_hist=hist.tolist(), n_alpha=acceptance_by_depth(hist),
      vanilla_tok_per_s=v_tokens / v_time, spec_tok_per_s=s_tokens / s_time,
      speedup=(s_tokens / s_time) / (v_tokens / v_time), identical_outputs=same,
      vanilla_tokens=v_tokens, spec_tokens=s_tokens)

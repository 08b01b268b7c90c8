"""Pick the draft tree size for the hardware at hand by timing the target's verification forward.

A tree of N draft tokens costs one target forward over N+1 tokens. On accelerators that is nearly flat
in N up to a point; on CPUs it grows early. We take the largest candidate N whose forward costs at most
`max_ratio` times a single-token decode step (the tokens it can win grow ~log N, its cost linearly).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from vsd_jax.models.kv_cache import KVCache


def time_forward(target, num_tokens: int, context: int = 256, repeats: int = 5) -> float:
  """Seconds (best of `repeats`) of one cached target forward over num_tokens new tokens."""
  cache = KVCache.zeros(target.config, 1, context + num_tokens)
  f = jax.jit(lambda p, t, c, w: target.model.apply({"params": p}, t, kv_cache=c, write_index=w).logits)
  toks, w = jnp.zeros((1, num_tokens), jnp.int32), jnp.asarray([context], jnp.int32)
  jax.block_until_ready(f(target.params, toks, cache, w))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(target.params, toks, cache, w))
    best = min(best, time.perf_counter() - t0)
  return best


def pick_total_tokens(target, candidates=(4, 8, 12, 16, 24, 32, 48, 64), max_ratio: float = 2.0):
  """-> (chosen total_tokens, {N: seconds}) with seconds[0] the single-token step."""
  base = time_forward(target, 1)
  times = {0: base}
  chosen = candidates[0]
  for n in candidates:
    times[n] = time_forward(target, n + 1)
    if times[n] <= max_ratio * base:
      chosen = n
  return chosen, times

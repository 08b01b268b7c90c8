"""Token selection from logits: greedy (T=0), temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def warp_logits(logits: jax.Array, temperature, top_p: float = 1.0) -> jax.Array:
  """Log-probabilities of the sampling distribution: softmax(logits / T) restricted to the top-p nucleus.

  logits: float32 [..., V]; temperature: scalar > 0; top_p: static float in (0, 1].
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6), axis=-1)
  if top_p >= 1.0:
    return logp
  sorted_logp = jnp.sort(logp, axis=-1)[..., ::-1]
  cum = jnp.cumsum(jnp.exp(sorted_logp), axis=-1)
  # Keep the smallest set whose mass reaches top_p: a token is kept if the mass before it is < top_p.
  keep_sorted = (cum - jnp.exp(sorted_logp)) < top_p
  threshold = jnp.min(jnp.where(keep_sorted, sorted_logp, jnp.inf), axis=-1, keepdims=True)
  logp = jnp.where(logp >= threshold, logp, -jnp.inf)
  return jax.nn.log_softmax(logp, axis=-1)


def sample_token(logits: jax.Array, rng: jax.Array, temperature, top_p: float = 1.0) -> jax.Array:
  """int32 [...] tokens from float32 [..., V] logits; temperature == 0 means argmax (traced value ok)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampled = jax.random.categorical(rng, warp_logits(logits, temperature, top_p), axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)

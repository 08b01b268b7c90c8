"""Acceptance and path utility (VSD_METHOD.md section 2), all elementwise over leading axes [..., K].

    greedy (T = 0):      a_k = 1[z_k == argmax p_k]
    stochastic (T > 0):  a_k = min(1, p_k^T(z_k) / q_k(z_k))
    U(z)     = sum_k prod_{j<=k} a_j        expected number of draft tokens a chain verification accepts
    kappa(z) = prod_k a_k                   full-path acceptance
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsd_jax.resolved import ACCEPT_MODES, UTILITIES  # config.vsd.accept_mode / utility


def acceptance(mode: str, tokens: jax.Array, q_token_prob: jax.Array, target_argmax: jax.Array,
               target_token_prob: jax.Array) -> jax.Array:
  """Per-token acceptance a_k, float32 [..., K], from the oracle's reduced p_k (`oracle.OracleOutputs`).

  mode: "greedy" (reads target_argmax) or "stochastic" (reads target_token_prob). tokens: int32 [..., K] target
  ids of z_k; q_token_prob: [..., K] q_k(z_k) under the proposal; target_argmax: int32 [..., K] argmax p_k;
  target_token_prob: [..., K] p_k^T(z_k) at the acceptance temperature T.
  """
  if mode == "greedy":
    return (tokens == target_argmax).astype(jnp.float32)
  if mode == "stochastic":
    return jnp.minimum(1.0, target_token_prob / jnp.maximum(q_token_prob, 1e-30))
  raise ValueError(f"acceptance mode {mode!r} is not one of {ACCEPT_MODES}")


def expected_length(a: jax.Array) -> jax.Array:
  """U = sum_k prod_{j<=k} a_j over the last axis."""
  return jnp.sum(jnp.cumprod(a, axis=-1), axis=-1)


def full_acceptance(a: jax.Array) -> jax.Array:
  """kappa = prod_k a_k over the last axis."""
  return jnp.prod(a, axis=-1)


def utility(a: jax.Array, kind: str) -> jax.Array:
  if kind == "expected_length":
    return expected_length(a)
  if kind == "full_accept":
    return full_acceptance(a)
  raise ValueError(f"vsd.utility={kind!r} is not one of {UTILITIES}")


def accepted_length(a: jax.Array, u: jax.Array) -> jax.Array:
  """Realised accepted length L (int32 [...]): the number of leading tokens with u_k < a_k, one uniform
  u_k in [0, 1) per token (for 0/1 greedy acceptances: the matching prefix)."""
  return jnp.sum(jnp.cumprod((u < a).astype(jnp.int32), axis=-1), axis=-1)


def depth_acceptance(a: jax.Array, weights: jax.Array) -> tuple:
  """Per-depth conditional acceptance c_k (n-alpha): sum w * prod_{j<k} a_j * a_k / sum w * prod_{j<k} a_j.
  a: [P, K] (P paths); weights: [P] (0 drops a path). Returns (c [K], reach [K] the denominators)."""
  reach = jnp.concatenate([jnp.ones_like(a[:, :1]), jnp.cumprod(a, axis=-1)[:, :-1]], axis=-1)
  reach = reach * weights[:, None]
  num = jnp.sum(reach * a, axis=0)
  den = jnp.sum(reach, axis=0)
  return num / jnp.maximum(den, 1e-9), den

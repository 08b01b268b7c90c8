"""VSD M-step losses (VSD_METHOD.md section 5): ARW on the E-step sample, CAR on the visited positions.

Paths are flattened to [A, S, K] (A anchor rows, S proposals, K depth); E-step weights w [A, S] (zero rows drop
an anchor). Depth k is 1-based in the formulas and 0-based in arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rejection_strength(accept_rate: jax.Array, eta: float, eta_max: float) -> jax.Array:
  """eta_k = eta * clip(c_k / (1 - c_k), 0, eta_max) from per-depth acceptance rates c [K]: rejections are
  pushed down gently while they are common (low c_k) and harder once they become rare."""
  c = jnp.clip(accept_rate, 0.0, 1.0 - 1e-6)
  return eta * jnp.clip(c / (1.0 - c), 0.0, eta_max)


def arw_token_weights(accepted_len: jax.Array, a: jax.Array, eta_k: jax.Array, *, rho0: float = 0.0,
                      rho: float = 1.0, gamma: float = 1.0) -> tuple:
  """Adaptive Rejection Weighting. accepted_len: int32 [...] realised L; a: [..., K]; eta_k: [K].

  Returns (likelihood weights, unlikelihood weights), each float32 [..., K]:
    k <= L:      likelihood weight 1
    k == L + 1:  unlikelihood weight eta_k * (1 - a_k)
    k > L + 1:   likelihood weight rho0 * rho**(k - L - 1)
  both times the depth discount gamma**(k - 1).
  """
  k_dim = a.shape[-1]
  k = jnp.arange(1, k_dim + 1, dtype=jnp.int32)
  ell = accepted_len[..., None]
  disc = jnp.asarray(gamma, jnp.float32) ** (k - 1).astype(jnp.float32)
  beyond = (k > ell + 1)
  like = jnp.where(k <= ell, 1.0, 0.0) + jnp.where(
      beyond, rho0 * jnp.asarray(rho, jnp.float32) ** jnp.maximum(k - ell - 1, 0).astype(jnp.float32), 0.0)
  unlike = jnp.where(k == ell + 1, eta_k * (1.0 - a), 0.0)
  return like * disc, unlike * disc


def weighted_path_loss(logq: jax.Array, like_w: jax.Array, unlike_w: jax.Array, path_w: jax.Array,
                       num_anchors=None) -> jax.Array:
  """sum over samples of w * sum_k [like_w * (-log q(z_k)) + unlike_w * (-log(1 - q(z_k)))] / #anchors.

  logq: [A, S, K] log q_psi(z_k) (differentiable); like_w, unlike_w: [A, S, K]; path_w: [A, S].
  num_anchors: the divisor; default the anchors whose weights are nonzero (the supported ones; config.vsd.arw_norm
  "supported"), or e.g. every existing anchor ("all": the term then shrinks with the supported fraction, as a
  per-anchor mean over the batch like EAGLE-3's loss). With like_w = 1, unlike_w = 0 this is the exact EM
  M-step objective -E_r[log q(z)] for the E-step distribution r = w.
  """
  q = jnp.exp(logq)
  unlikelihood = -jnp.log1p(-jnp.minimum(q, 1.0 - 1e-6))
  per_path = jnp.sum(like_w * -logq + unlike_w * unlikelihood, axis=-1)
  anchors = jnp.sum(jnp.any(path_w > 0, axis=-1)) if num_anchors is None else num_anchors
  return jnp.sum(path_w * per_path) / jnp.maximum(anchors, 1)


def car_loss(draft_logits: jax.Array, target_draft_logits: jax.Array, target_top_logp: jax.Array,
             visited: jax.Array, beta: float = 1.0) -> jax.Array:
  """Confidence-Aware Regularization: mean over visited positions of c(p_k) * KL(p_k || q_k).

  draft_logits: [..., N] q_k's logits (differentiable); target_draft_logits: [..., N] the oracle's logits of p_k
  at the draft vocabulary's ids (`oracle.OracleOutputs.draft_logits`); target_top_logp: [...] max_v log p_k(v)
  over the full vocabulary; visited: [...] 0/1 weights (the reachable positions k <= L + 1). p_k is restricted
  to the draft vocabulary and renormalised (EAGLE-3's soft labels); its confidence c(p) = (max_v p(v))^beta
  uses the full softmax.
  """
  tl = jax.lax.stop_gradient(target_draft_logits.astype(jnp.float32))
  conf = jnp.exp(beta * jax.lax.stop_gradient(target_top_logp.astype(jnp.float32)))
  logp = jax.nn.log_softmax(tl, axis=-1)
  logq = jax.nn.log_softmax(draft_logits, axis=-1)
  kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
  return jnp.sum(visited * conf * kl) / jnp.maximum(jnp.sum(visited), 1.0)


def update_acceptance_ema(state: dict, batch_rate: jax.Array, seen: jax.Array, decay: float) -> dict:
  """Bias-corrected EMA of per-depth acceptance. state {"ema": [K], "weight": [K]}; batch_rate [K]; seen [K]
  bool (depths with no reaching path this batch keep their value)."""
  ema = jnp.where(seen, decay * state["ema"] + (1 - decay) * batch_rate, state["ema"])
  weight = jnp.where(seen, decay * state["weight"] + (1 - decay), state["weight"])
  return {"ema": ema, "weight": weight}


def acceptance_from_ema(state: dict, default: float = 0.5) -> jax.Array:
  """c_k [K]: the bias-corrected EMA, `default` where nothing was seen yet."""
  return jnp.where(state["weight"] > 0, state["ema"] / jnp.maximum(state["weight"], 1e-12), default)

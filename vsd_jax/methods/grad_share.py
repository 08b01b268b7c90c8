"""Hold one loss term's share of the gradient norm fixed: g = g_anchor + c * g_extra, c from both gradients' norms.

A method whose loss adds terms to an anchor loss (VSD: ARW and CAR added to EAGLE-3's TTT loss) changes the
gradient's size as well as its direction; under global-norm clipping larger extra terms crowd the anchor term out.
`hold_share` returns the two losses unchanged but gives them the gradient

    g = g_anchor + c * g_extra,   c = (1 - share) / share * |g_anchor| / |g_extra|   (0 when g_extra = 0)

so that |g_anchor| / (|g_anchor| + |c g_extra|) = share whatever the extra terms' weights: sweeping the weights
among the extra terms (lambda_car, eta, ...) then changes only their direction. One forward pass and two backward
passes (each term's vector-Jacobian product, from the same linearisation).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def share_scale(g_anchor, g_extra, share: float) -> jax.Array:
  """c with |g_anchor| / (|g_anchor| + c |g_extra|) = share; 0 when g_extra is zero."""
  na, nx = optax.global_norm(g_anchor), optax.global_norm(g_extra)
  return jnp.where(nx > 0, (1.0 - share) / share * na / jnp.maximum(nx, 1e-30), 0.0)


def hold_share(fn: Callable, params, share: float):
  """fn(params) -> ((anchor loss, extra loss), aux) -> the same outputs, differentiable in params with the gradient
  of anchor + extra rescaled as in the module docstring (the cotangents of the two losses scale each term).
  share: static, in (0, 1). aux (metrics) gets no gradient."""
  if not 0 < share < 1:
    raise ValueError(f"hold_share: share={share} must be in (0, 1)")

  @jax.custom_vjp
  def f(p):
    return fn(p)

  def fwd(p):
    losses, vjp, aux = jax.vjp(fn, p, has_aux=True)
    return (losses, aux), vjp

  def bwd(vjp, cts):
    (ct_anchor, ct_extra), _ = cts
    zero = jnp.zeros_like(ct_anchor)
    g_anchor, = vjp((ct_anchor, zero))
    g_extra, = vjp((zero, ct_extra))
    c = share_scale(g_anchor, g_extra, share)
    return (jax.tree_util.tree_map(lambda a, b: a + c * b, g_anchor, g_extra),)

  f.defvjp(fwd, bwd)
  return f(params)


"""Exact VSD on the teacher-forced chain: J = log E_q[U] without sampling and without an oracle pass.

config.vsd.estep = "exact". Why it is exact (VSD_METHOD.md sections 2-3): the training responses are the
target's own greedy output, so at T = 0 the only path with U > 0 from anchor t is the target's greedy
continuation y_1..y_K, which is the data (cut where a data token is not the target's argmax). A path
drawn from q follows it for k steps with probability

    P_k = prod_{j<=k} q_j(y_j) * 1[y_j == argmax p_j]          so  E_q[U] = sum_k P_k

and the q_j(y_j) are exactly the teacher-forced TTT states EAGLE-3's loss already unrolls (`TTTRows`).
The exact posterior of EM is pi(k) = P_k / sum P; its M-step gradient is -grad J, with per-step weights

    w_j = sum_{k>=j} P_k / sum_k P_k      (the posterior probability that the accepted path reaches step j)

For T > 0 (accept_mode "stochastic") a_j = alpha_j = sum_v min(p_j(v), q_j(v)), the probability that
speculative sampling accepts the draft's token at that state, evaluated at the data's states (exact for
chain decoding when the data is sampled from p; with greedy data it is the visited-states approximation).

Two forms (config.vsd.exact_form), each added to mu * EAGLE-3's TTT loss:
  "log_u":  lambda_exact * mean over supported anchors of -log sum_k P_k   (the objective J itself)
  "reach":  EAGLE-3's per-step CE reweighted per row by the chance the draft's chain reaches that step,
            r_k = prod_{j<k} a_j under stop_gradient, normalised to mean 1 per step over the counted rows:
            capacity moves to the states decoding visits (replaces the plain EAGLE-3 term; mu scales it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vsd_jax.methods.eagle3 import batch_loss, scalar_metrics
from vsd_jax.methods.eagle3.loss import TTTRows
from vsd_jax.methods.grad_share import hold_share
from vsd_jax.resolved import EXACT_FORMS, Resolved  # noqa: F401 (EXACT_FORMS: config.vsd.exact_form, named here)


class ExactTerms(NamedTuple):
  """VSD's exact objective on the teacher-forced chain; per-row arrays are [B, T], per-step [K, B, T]."""
  neg_j: jax.Array          # scalar: mean over supported anchors of -log E_q[U]
  log_accept: jax.Array     # [K, B, T] log a_k (-inf where the chain cannot go on), differentiable
  reach: jax.Array          # [K, B, T] prod_{j<k} a_j under stop_gradient (1 at k = 0 for existing rows)
  expected_u: jax.Array     # [B, T] E_q[U] = sum_k P_k under stop_gradient
  supported: jax.Array      # [B, T] float 0/1: anchors with E_q[U] > 0
  anchors: jax.Array        # [B, T] float 0/1: rows that predict a response token at step 0


def exact_terms(rows: TTTRows, accept_mode: str) -> ExactTerms:
  """TTTRows [K, B, T] -> ExactTerms. accept_mode "greedy": a_k = q_k(y_k) 1[y_k greedy]; "stochastic": alpha_k."""
  exists = rows.exists > 0
  if accept_mode == "greedy":
    ok = exists & (rows.greedy > 0)
    log_a = jnp.where(ok, rows.logq_data, -jnp.inf)
  elif accept_mode == "stochastic":
    ok = exists & (rows.overlap > 0)
    log_a = jnp.where(ok, jnp.log(jnp.where(ok, rows.overlap, 1.0)), -jnp.inf)
  else:
    raise ValueError(f"config.vsd.accept_mode={accept_mode!r}: use 'greedy' or 'stochastic'")
  # log P_k with the chain cut at the first impossible step; safe for the gradient (no inf - inf)
  cut = jnp.cumsum(~ok, axis=0) > 0                                             # [K, B, T]
  log_p = jnp.cumsum(jnp.where(ok, log_a, 0.0), axis=0)
  log_p = jnp.where(cut, -jnp.inf, log_p)
  supported = ~cut[0]
  log_u = jax.scipy.special.logsumexp(jnp.where(supported[None], log_p, 0.0), axis=0)   # [B, T]
  n_sup = jnp.maximum(jnp.sum(supported), 1)
  neg_j = -jnp.sum(jnp.where(supported, log_u, 0.0)) / n_sup
  a = jnp.exp(jax.lax.stop_gradient(log_p))                                     # P_k
  reach = jnp.concatenate([jnp.ones_like(a[:1]), a[:-1]], axis=0) * exists[:1]
  return ExactTerms(neg_j, log_a, reach, jnp.sum(a, axis=0), supported.astype(jnp.float32),
                    exists[0].astype(jnp.float32))


def reach_weighted_ce(rows: TTTRows, reach: jax.Array, decay: float) -> jax.Array:
  """sum_k decay^k * (sum_rows r_k ce_k / sum_rows r_k) over EAGLE-3's counted rows: each step's CE averaged
  with the reach weights (mean 1 per step), so only their distribution over rows differs from EAGLE-3's."""
  w = reach * rows.ce_counted
  per_step = jnp.sum(w * rows.ce, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-9)
  k = rows.ce.shape[0]
  return jnp.sum(jnp.asarray(decay, jnp.float32) ** jnp.arange(k, dtype=jnp.float32) * per_step)


def make_exact_loss(settings: Resolved, target, draft):
  """loss_fn(params, frozen, batch, rng, method_state) -> (loss, (metrics, method_state)) for vsd.estep="exact".

  Reads the same batch as EAGLE-3 (in-step target features or the precomputed feature cache); the method
  state (VSD's acceptance EMA) is carried unchanged. settings: validated by `vsd_jax.resolved.resolve` (there
  vsd.depth <= draft.ttt_steps, and eagle3_grad_share > 0 only with exact_form "log_u")."""
  v, d = settings.vsd, settings.draft
  form, accept_mode, depth = v.exact_form, v.accept_mode, v.depth
  lam, mu, decay, share = v.lambda_exact, v.mu, d.step_decay, v.eagle3_grad_share

  def loss_fn(params, frozen, batch, rng, method_state):
    del rng

    def parts(p):
      """(mu * EAGLE-3 or the reach-weighted CE, lambda_exact * -J or 0), (EAGLE-3's metrics, exact terms)."""
      loss_e3, m3 = batch_loss(d, target, draft, p, frozen, batch, with_rows=True)
      rows = jax.tree_util.tree_map(lambda x: x[:depth], m3.pop("rows"))
      terms = exact_terms(rows, accept_mode)
      if form == "log_u":
        return (mu * loss_e3, lam * terms.neg_j), (loss_e3, m3, terms)
      return (mu * reach_weighted_ce(rows, terms.reach, decay), jnp.zeros(())), (loss_e3, m3, terms)

    if share > 0:  # the EAGLE-3 term keeps this share of the gradient norm (methods/grad_share.py)
      (anchor, extra), (loss_e3, m3, terms) = hold_share(parts, params, share)
    else:
      (anchor, extra), (loss_e3, m3, terms) = parts(params)
    total = anchor + extra
    metrics = scalar_metrics(m3)
    n = jnp.maximum(jnp.sum(terms.anchors), 1.0)
    metrics.update(loss_eagle3=loss_e3, neg_j=terms.neg_j,
                   mean_u=jnp.sum(terms.expected_u * terms.anchors) / n,   # E_q[U] over all anchors: tau_chain - 1
                   supported=jnp.sum(terms.supported) / n)
    for k in range(depth):   # c_k: P(step k accepted | reached), from the exact P_k
      den = jnp.sum(terms.reach[k])
      num = jnp.sum(terms.reach[k + 1]) if k + 1 < depth else jnp.sum(terms.expected_u) - jnp.sum(
          terms.reach[1:])
      metrics[f"c_{k + 1}"] = num / jnp.maximum(den, 1e-9)
    return total, (metrics, method_state)

  return loss_fn

"""VSD E-step (VSD_METHOD.md section 4): samples from the oracle-filtered posterior pi(z) ~ q(z) U(z).

Per anchor (A anchor rows = batch x M), S proposals z^(1..S) ~ q_old with utilities U_i. Both estimators return weights [A, S] over the
proposals (summing to 1 for an anchor with some U > 0, else all 0), so the M-step is one weighted sum.

  mcmc: an independence Metropolis-Hastings chain over the proposals in order (`jax.lax.scan`), started at
        the first proposal with U > 0; proposal i is accepted with probability min(1, U_i / U_cur) (the q
        terms cancel); the states after `burn_in` proposals, with multiplicity, are the sample.
  snis: self-normalised importance weights w_i = U_i / sum_j U_j.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vsd_jax.resolved import SAMPLED_ESTEPS as ESTEPS  # the E-steps over sampled proposals


class EStep(NamedTuple):
  weights: jax.Array      # float32 [A, S]
  supported: jax.Array    # bool [A]: some proposal has U > 0
  accept_rate: jax.Array  # float32 [A]: MH moves accepted / proposals after the start (1 for snis)
  ess: jax.Array          # float32 [A]: effective sample size (sum w)^2 / sum w^2 of the weights, in [0, S]


def _ess(w: jax.Array) -> jax.Array:
  return jnp.sum(w, -1) ** 2 / jnp.maximum(jnp.sum(w * w, -1), 1e-30)


def snis_weights(u: jax.Array) -> EStep:
  """u: [A, S] utilities >= 0 -> EStep with w = U / sum U."""
  total = jnp.sum(u, axis=-1, keepdims=True)
  w = jnp.where(total > 0, u / jnp.maximum(total, 1e-30), 0.0)
  supported = total[:, 0] > 0
  return EStep(w, supported, supported.astype(jnp.float32), _ess(w))


def mh_chain_states(u: jax.Array, rng: jax.Array) -> tuple:
  """Run the independence MH chain over the proposals. u: [A, S]. Returns (states int32 [S, A]: the chain's
  state after each proposal, accepted bool [S, A]: proposal i moved the chain)."""
  n, s = u.shape
  supported = jnp.any(u > 0, axis=-1)
  start = jnp.argmax(u > 0, axis=-1).astype(jnp.int32)
  coins = jax.random.uniform(rng, (s, n))

  def step(carry, xs):
    cur, cur_u = carry
    i, coin = xs
    prop_u = u[:, i]
    # Accept with probability min(1, U_i / U_cur); U_cur > 0 once started, so no division by zero.
    move = supported & (coin * cur_u < prop_u) & (i != cur)
    cur = jnp.where(move, i, cur)
    cur_u = jnp.where(move, prop_u, cur_u)
    return (cur, cur_u), (cur, move)

  init = (start, jnp.take_along_axis(u, start[:, None], axis=1)[:, 0])
  _, (states, moves) = jax.lax.scan(step, init, (jnp.arange(s, dtype=jnp.int32), coins))
  return states, moves


def mcmc_weights(u: jax.Array, rng: jax.Array, burn_in: int) -> EStep:
  """u: [A, S] -> EStep: weights = multiplicity of each proposal among the states after burn_in proposals."""
  n, s = u.shape
  if not 0 <= burn_in < s:
    raise ValueError(f"vsd.burn_in={burn_in} must be in [0, num_paths={s}): the chain keeps the states after "
                     "burn_in of its S proposals")
  supported = jnp.any(u > 0, axis=-1)
  states, moves = mh_chain_states(u, rng)
  kept = states[burn_in:]                                                    # [S - burn_in, A]
  counts = jnp.zeros((n, s), jnp.float32).at[jnp.arange(n)[None, :], kept].add(1.0)
  w = jnp.where(supported[:, None], counts / (s - burn_in), 0.0)
  start = jnp.argmax(u > 0, axis=-1)
  after_start = jnp.arange(s)[:, None] > start[None, :]                      # [S, A]
  rate = jnp.sum(moves & after_start, 0) / jnp.maximum(jnp.sum(after_start, 0), 1)
  return EStep(w, supported, rate.astype(jnp.float32), _ess(w))


def estep_weights(u: jax.Array, rng: jax.Array, method: str, burn_in: int) -> EStep:
  if method == "mcmc":
    return mcmc_weights(u, rng, burn_in)
  if method == "snis":
    return snis_weights(u)
  raise ValueError(f"vsd.estep={method!r} is not one of {ESTEPS}")


def elbo_estimate(u: jax.Array, w: jax.Array) -> jax.Array:
  """Per-anchor ELBO of the weighted sample r = w over the S proposals of q: E_r[log U] - KL(r || q_hat),
  q_hat uniform over the proposals. Equals log mean_i U_i (the Monte Carlo estimate of J) for snis weights
  and is below it for any other r. u, w: [A, S]; anchors without support give 0."""
  s = u.shape[-1]
  pos = w > 0
  log_u = jnp.log(jnp.where(pos, u, 1.0))
  kl = jnp.where(pos, w * jnp.log(jnp.where(pos, w * s, 1.0)), 0.0)
  return jnp.sum(jnp.where(pos, w * log_u, 0.0), -1) - jnp.sum(kl, -1)

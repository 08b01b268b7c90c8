"""VSD's loss for the generic trainer: one online EM iteration per batch (see the package docstring)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsd_jax.data.draft_vocab import draft_vocab_ids
from vsd_jax.methods.eagle3 import scalar_metrics
from vsd_jax.methods.eagle3.loss import eagle3_loss
from vsd_jax.methods.vsd import estep, mstep, utility
from vsd_jax.methods.vsd.oracle import oracle_logits, oracle_slots
from vsd_jax.methods.vsd.paths import choose_anchors, unroll_draft_paths
from vsd_jax.models.draft_unroll import sequence_step
from vsd_jax.models.features import target_pass


def check_config(v) -> None:
  """Raise ValueError naming the config.vsd field that is out of range."""
  def bad(field, why):
    raise ValueError(f"config.vsd.{field}={v[field]!r}: {why}")
  for field in ("depth", "num_paths", "num_anchors"):
    if int(v[field]) < 1:
      bad(field, "must be >= 1")
  if not 0 <= int(v.burn_in) < int(v.num_paths):
    bad("burn_in", f"must be in [0, num_paths={v.num_paths})")
  if float(v.draft_temperature) <= 0:
    bad("draft_temperature", "must be > 0 (the E-step samples proposals from q)")
  if v.accept_mode not in utility.ACCEPT_MODES:
    bad("accept_mode", f"use one of {utility.ACCEPT_MODES}")
  if v.accept_mode == "stochastic" and float(v.accept_temperature) <= 0:
    bad("accept_temperature", "must be > 0 with accept_mode='stochastic'")
  if v.utility not in utility.UTILITIES:
    bad("utility", f"use one of {utility.UTILITIES}")
  if v.estep not in estep.ESTEPS:
    bad("estep", f"use one of {estep.ESTEPS}")
  if not 0 <= float(v.ema_decay) < 1:
    bad("ema_decay", "must be in [0, 1)")
  for field in ("eta", "eta_max", "rho0", "rho", "gamma", "lambda_car", "car_beta", "mu"):
    if float(v[field]) < 0:
      bad(field, "must be >= 0")


def initial_method_state(depth: int) -> dict:
  """The per-depth acceptance EMA (mstep.update_acceptance_ema) before the first step: float32 [K] each."""
  return {"ema": jnp.zeros((depth,), jnp.float32), "weight": jnp.zeros((depth,), jnp.float32)}


def make_vsd_loss(config, target, draft):
  """loss_fn(params, frozen, batch, rng, method_state) -> (loss, (metrics, new method_state))."""
  v = config.vsd
  check_config(v)
  k_max, s, m = int(v.depth), int(v.num_paths), int(v.num_anchors)
  draft_temperature = float(v.draft_temperature)
  model = target.model

  def loss_fn(params, frozen, batch, rng, method_state):
    ids = batch["input_ids"]
    valid = batch["attention_mask"].astype(bool)
    loss_mask = batch["loss_mask"]
    b, t = ids.shape
    rows = b * m   # anchor rows: E-step/M-step arrays are [rows, S, K]
    embed = frozen["target"]["embed_tokens"]["embedding"]
    d2t = frozen["d2t"].astype(jnp.int32)
    r_anchor, r_paths, r_chain, r_u = jax.random.split(rng, 4)

    tp = target_pass(model, frozen["target"], ids, valid, cache_slots=oracle_slots(t, m, s, k_max))
    anchors, ok = choose_anchors(loss_mask, valid, m, r_anchor)

    # One draft pass: step 0 over the sequences (shared with the EAGLE-3 term), then the S paths per anchor,
    # sampled from q_old (this step's q, ids drawn under stop_gradient) with differentiable logits for the M-step.
    step0 = sequence_step(draft, params, embed, tp.features, ids, valid)
    paths = unroll_draft_paths(params, draft, embed, tp.features, ids, valid, anchors, d2t, num_paths=s,
                               depth=k_max, temperature=draft_temperature, rng=r_paths, step0=step0)
    logq_old = jax.lax.stop_gradient(paths.logq)

    # E-step: the oracle over all proposals, utilities, posterior weights.
    p_logits = oracle_logits(model, frozen["target"], tp.kv_cache, t, tp.logits, anchors, paths.tokens)
    a = utility.acceptance(p_logits, paths.tokens, jnp.exp(logq_old), v.accept_mode,
                           float(v.accept_temperature)).reshape(rows, s, k_max)
    okf = ok.reshape(rows).astype(jnp.float32)
    u = utility.utility(a, v.utility) * okf[:, None]
    est = estep.estep_weights(u, r_chain, v.estep, int(v.burn_in))
    w = est.weights * okf[:, None]
    realised = utility.accepted_length(a, jax.random.uniform(r_u, a.shape))
    batch_c, reach = utility.depth_acceptance(a.reshape(rows * s, k_max), jnp.repeat(okf, s))
    c_k = mstep.acceptance_from_ema(method_state)
    new_state = mstep.update_acceptance_ema(method_state, batch_c, reach > 0, float(v.ema_decay))

    # M-step: ARW on the weighted sample, CAR on the proposals' reachable positions.
    logq = paths.logq.reshape(rows, s, k_max)
    if bool(v.arw):
      eta_k = mstep.rejection_strength(c_k, float(v.eta), float(v.eta_max))
      like, unlike = mstep.arw_token_weights(realised, a, eta_k, rho0=float(v.rho0), rho=float(v.rho),
                                             gamma=float(v.gamma))
    else:  # the plain EM M-step: likelihood of every token of the E-step sample
      like = jnp.broadcast_to(float(v.gamma) ** jnp.arange(k_max, dtype=jnp.float32), a.shape)
      unlike = jnp.zeros_like(a)
    loss_arw = mstep.weighted_path_loss(logq, like, unlike, w)
    total = loss_arw
    metrics = {}
    loss_car = jnp.zeros(())
    if float(v.lambda_car) > 0:
      visited = (jnp.arange(1, k_max + 1)[None, None, :] <= realised[..., None] + 1) * okf[:, None, None]
      loss_car = mstep.car_loss(paths.logits.reshape(rows, s, k_max, -1), p_logits.reshape(rows, s, k_max, -1),
                                draft_vocab_ids(d2t), visited, float(v.car_beta))
      total = total + float(v.lambda_car) * loss_car
    loss_e3 = jnp.zeros(())
    if float(v.mu) > 0:
      loss_e3, m3 = eagle3_loss(params, draft, embed, tp.features, ids, tp.logits, loss_mask, frozen["t2d"], d2t,
                                num_steps=int(config.draft.ttt_steps), decay=float(config.draft.step_decay),
                                attention_mask=valid, step0=step0)
      metrics.update(scalar_metrics(m3))
      total = total + float(v.mu) * loss_e3

    anchors_n = jnp.maximum(jnp.sum(okf), 1.0)
    proposals_u = jnp.sum(u) / (anchors_n * s)
    sup = est.supported.astype(jnp.float32) * okf
    sup_n = jnp.maximum(jnp.sum(sup), 1.0)
    snis = estep.snis_weights(u)
    metrics.update(
        loss_arw=loss_arw, loss_car=loss_car, loss_eagle3=loss_e3,
        mean_u=proposals_u,                                  # E_q[U]: tau_chain - 1
        log_mean_u=jnp.log(jnp.maximum(proposals_u, 1e-9)),  # J estimate (batch level)
        kappa=jnp.sum(utility.full_acceptance(a) * okf[:, None]) / (anchors_n * s),
        elbo=jnp.sum(estep.elbo_estimate(u, w) * sup) / sup_n,
        supported=jnp.sum(sup) / anchors_n,
        chain_accept=jnp.sum(est.accept_rate * sup) / sup_n,
        ess_frac=jnp.sum(snis.ess * sup) / (sup_n * s),
        anchors=jnp.sum(okf))
    for k in range(k_max):
      metrics[f"c_{k + 1}"] = batch_c[k]
      metrics[f"c_ema_{k + 1}"] = c_k[k]
    return total, (metrics, new_state)

  return loss_fn

"""VSD as a training method for the generic trainer: one online EM iteration per batch.

Per batch (VSD_METHOD.md): the target runs once over the sequences (features, logits, KV cache); M anchors
per sequence; E-step: S draft paths of depth K per anchor from q_old (stop_gradient), the oracle's p_k for
all of them in one tree forward, acceptance a_k, utility U, MCMC or SNIS weights over the proposals;
M-step: ARW on the weighted sample + lambda_car * CAR on the visited positions + mu * EAGLE-3's TTT loss.
The per-depth acceptance EMA c_k (ARW's eta_k) is the method state carried between steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsd_jax.data.draft_vocab import draft_to_target
from vsd_jax.training import vsd_estep, vsd_mstep, vsd_utility
from vsd_jax.training.eagle3_loss import eagle3_loss, target_pass
from vsd_jax.training.eagle3_method import _scalar_metrics, build_eagle3
from vsd_jax.training.methods import Method
from vsd_jax.training.vsd_oracle import oracle_logits, oracle_slots
from vsd_jax.training.vsd_paths import choose_anchors, sample_draft_paths, score_draft_paths


def check_vsd_config(v) -> None:
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
  if v.accept_mode not in vsd_utility.ACCEPT_MODES:
    bad("accept_mode", f"use one of {vsd_utility.ACCEPT_MODES}")
  if v.accept_mode == "stochastic" and float(v.accept_temperature) <= 0:
    bad("accept_temperature", "must be > 0 with accept_mode='stochastic'")
  if v.utility not in vsd_utility.UTILITIES:
    bad("utility", f"use one of {vsd_utility.UTILITIES}")
  if v.estep not in vsd_estep.ESTEPS:
    bad("estep", f"use one of {vsd_estep.ESTEPS}")
  if not 0 <= float(v.ema_decay) < 1:
    bad("ema_decay", "must be in [0, 1)")
  for field in ("eta", "eta_max", "rho0", "rho", "gamma", "lambda_car", "car_beta", "mu"):
    if float(v[field]) < 0:
      bad(field, "must be >= 0")


def initial_method_state(depth: int) -> dict:
  return {"ema": jnp.zeros((depth,), jnp.float32), "weight": jnp.zeros((depth,), jnp.float32)}


def make_vsd_loss(config, target, draft):
  """loss_fn(params, frozen, batch, rng, method_state) -> (loss, (metrics, new method_state))."""
  v = config.vsd
  check_vsd_config(v)
  k_max, s, m = int(v.depth), int(v.num_paths), int(v.num_anchors)
  tau = float(v.draft_temperature)
  model = target.model

  def loss_fn(params, frozen, batch, rng, method_state):
    ids = batch["input_ids"]
    valid = batch["attention_mask"].astype(bool)
    loss_mask = batch["loss_mask"]
    b, t = ids.shape
    n = b * m
    embed = frozen["target"]["embed_tokens"]["embedding"]
    d2t = frozen["d2t"].astype(jnp.int32)
    r_anchor, r_paths, r_chain, r_u = jax.random.split(rng, 4)

    tp = target_pass(model, frozen["target"], ids, valid, cache_slots=oracle_slots(t, m, s, k_max))
    anchors, ok = choose_anchors(loss_mask, valid, m, r_anchor)

    # E-step: proposals from q_old, the oracle over all of them, utilities, posterior weights.
    paths = sample_draft_paths(params, draft, embed, tp.features, ids, valid, anchors, d2t, r_paths,
                               num_paths=s, depth=k_max, temperature=tau)
    p_logits = oracle_logits(model, frozen["target"], tp.kv_cache, t, tp.logits, anchors, paths.tokens)
    a = vsd_utility.acceptance(p_logits, paths.tokens, jnp.exp(paths.logq), v.accept_mode,
                               float(v.accept_temperature)).reshape(n, s, k_max)
    okf = ok.reshape(n).astype(jnp.float32)
    u = vsd_utility.utility(a, v.utility) * okf[:, None]
    est = vsd_estep.estep_weights(u, r_chain, v.estep, int(v.burn_in))
    w = est.weights * okf[:, None]
    realised = vsd_utility.accepted_length(a, jax.random.uniform(r_u, a.shape))
    batch_c, reach = vsd_utility.depth_acceptance(a.reshape(n * s, k_max), jnp.repeat(okf, s))
    c_k = vsd_mstep.acceptance_from_ema(method_state)
    new_state = vsd_mstep.update_acceptance_ema(method_state, batch_c, reach > 0, float(v.ema_decay))

    # M-step: ARW on the weighted sample, CAR on the proposals' reachable positions.
    scored = score_draft_paths(params, draft, embed, tp.features, ids, valid, anchors, d2t, paths.draft_ids,
                               temperature=tau)
    logq = scored.logq.reshape(n, s, k_max)
    if bool(v.arw):
      eta_k = vsd_mstep.rejection_strength(c_k, float(v.eta), float(v.eta_max))
      like, unlike = vsd_mstep.arw_token_weights(realised, a, eta_k, rho0=float(v.rho0), rho=float(v.rho),
                                                 gamma=float(v.gamma))
    else:  # the plain EM M-step: likelihood of every token of the E-step sample
      like = jnp.broadcast_to(float(v.gamma) ** jnp.arange(k_max, dtype=jnp.float32), a.shape)
      unlike = jnp.zeros_like(a)
    loss_arw = vsd_mstep.weighted_path_loss(logq, like, unlike, w)
    total = loss_arw
    metrics = {}
    loss_car = jnp.zeros(())
    if float(v.lambda_car) > 0:
      visited = (jnp.arange(1, k_max + 1)[None, None, :] <= realised[..., None] + 1) * okf[:, None, None]
      loss_car = vsd_mstep.car_loss(scored.logits.reshape(n, s, k_max, -1), p_logits.reshape(n, s, k_max, -1),
                                    draft_to_target(jnp.arange(d2t.shape[0], dtype=jnp.int32), d2t), visited,
                                    float(v.car_beta))
      total = total + float(v.lambda_car) * loss_car
    loss_e3 = jnp.zeros(())
    if float(v.mu) > 0:
      loss_e3, m3 = eagle3_loss(params, draft, embed, tp.features, ids, tp.logits, loss_mask, frozen["t2d"], d2t,
                                num_steps=int(config.draft.ttt_steps), decay=float(config.draft.step_decay),
                                attention_mask=valid)
      metrics.update(_scalar_metrics(m3))
      total = total + float(v.mu) * loss_e3

    anchors_n = jnp.maximum(jnp.sum(okf), 1.0)
    proposals_u = jnp.sum(u) / (anchors_n * s)
    sup = est.supported.astype(jnp.float32) * okf
    sup_n = jnp.maximum(jnp.sum(sup), 1.0)
    snis = vsd_estep.snis_weights(u)
    metrics.update(
        loss_arw=loss_arw, loss_car=loss_car, loss_eagle3=loss_e3,
        mean_u=proposals_u,                                  # E_q[U]: tau_chain - 1
        log_mean_u=jnp.log(jnp.maximum(proposals_u, 1e-9)),  # J estimate (batch level)
        kappa=jnp.sum(vsd_utility.full_acceptance(a) * okf[:, None]) / (anchors_n * s),
        elbo=jnp.sum(vsd_estep.elbo_estimate(u, w) * sup) / sup_n,
        supported=jnp.sum(sup) / anchors_n,
        chain_accept=jnp.sum(est.accept_rate * sup) / sup_n,
        ess_frac=jnp.sum(snis.ess * sup) / (sup_n * s),
        anchors=jnp.sum(okf))
    for k in range(k_max):
      metrics[f"c_{k + 1}"] = batch_c[k]
      metrics[f"c_ema_{k + 1}"] = c_k[k]
    return total, (metrics, new_state)

  return loss_fn


def build_vsd(config, target, vocab) -> Method:
  """Method for config.method == "vsd": EAGLE-3's draft, params init and frozen inputs, VSD's loss."""
  draft, init_params, _, frozen = build_eagle3(config, target, vocab)
  loss_fn = make_vsd_loss(config, target, draft)
  return Method(draft, init_params, loss_fn, frozen, initial_method_state(int(config.vsd.depth)))

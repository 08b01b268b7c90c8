"""VSD's loss for the generic trainer: one online EM iteration per batch (see the package docstring).

The step in named pieces, each pure and jittable with typed outputs (A = B*M anchor rows, S proposals per
anchor, K depth, N draft vocabulary):

    batch_pass    the target's pass over the sequences (features, logits, KV cache), the anchors, the draft's
                  step 0 (shared by the paths and the EAGLE-3 term)                             -> BatchPass
    e_step        S proposals per anchor from q_old, the oracle's reduced p_k along them, acceptance, utility,
                  posterior weights, realised lengths, per-depth acceptance                     -> EStepOut
    m_step_loss   ARW on the weighted sample + lambda_car * CAR + mu * EAGLE-3's TTT loss      -> MStepLoss
    monitors      ELBO, E_q[U], kappa, chain acceptance, ESS, per-depth acceptance            -> Monitors

`make_vsd_loss` composes them into the trainer's loss_fn and carries the acceptance EMA c_k (ARW's eta_k)
between steps; config.vsd.estep == "exact" goes to `vsd_jax.methods.vsd.exact` instead. `make_heldout_metrics` is
the held-out report's measurement: EAGLE-3's per-step metrics and the draft's own sampled chains (`sample_chains`).
Every piece reads the typed settings of `vsd_jax.resolved` (VsdSettings, DraftSettings), validated at resolve.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vsd_jax.methods.eagle3 import drop_image_tokens, scalar_metrics
from vsd_jax.methods.eagle3.loss import eagle3_loss
from vsd_jax.methods.grad_share import hold_share
from vsd_jax.methods.vsd import estep, mstep, utility
from vsd_jax.methods.vsd.oracle import OracleOutputs, oracle_outputs, oracle_slots
from vsd_jax.methods.vsd.paths import DraftPaths, choose_anchors, unroll_draft_paths
from vsd_jax.models.draft_unroll import sequence_step
from vsd_jax.models.draft_vocab import draft_vocab_ids
from vsd_jax.models.features import TargetPass, embedding_matrix, image_inputs, target_pass
from vsd_jax.resolved import ARW_NORMS, DraftSettings, VsdSettings, as_resolved  # noqa: F401 (ARW_NORMS: named here)



def initial_method_state(depth: int) -> dict:
  """The per-depth acceptance EMA (mstep.update_acceptance_ema) before the first step: float32 [K] each."""
  return {"ema": jnp.zeros((depth,), jnp.float32), "weight": jnp.zeros((depth,), jnp.float32)}


class BatchPass(NamedTuple):
  """What every piece of the step reads: the batch, the target's pass over it, the anchors, the draft's step 0."""
  ids: jax.Array         # int32 [B, T]
  valid: jax.Array       # bool [B, T] valid tokens
  loss_mask: jax.Array   # [B, T] 1 on response tokens
  target: TargetPass     # features [B, T, 3H], logits float32 [B, T, V], kv_cache (oracle_slots(T, M, S, K) slots)
  step0: Any             # Eagle3Output: the draft over the sequences (`draft_unroll.sequence_step`), [B, T, ...]
  anchors: jax.Array     # int32 [B, M] anchor positions t (context s[<=t])
  ok: jax.Array          # bool [B, M] the anchor exists (False: fewer eligible positions than M)


class ChainSample(NamedTuple):
  """The draft's own chains from every anchor, verified by the target; A = B*M anchor rows, batch-major."""
  paths: DraftPaths        # [B, M, S, K] proposals z ~ q_old (ids under stop_gradient; logits/logq differentiable)
  oracle: OracleOutputs    # [B, M, S, K] the target's reduced p_k along them (draft_logits [.., K, N] with CAR)
  anchor_ok: jax.Array     # float32 [A] 1 on anchors that exist
  accept: jax.Array        # float32 [A, S, K] a_k
  utility: jax.Array       # float32 [A, S] U(z) (0 on anchors that do not exist)
  realised: jax.Array      # int32 [A, S] realised accepted length L (one shared uniform per token)
  depth_accept: jax.Array  # float32 [K] per-depth acceptance c_k over the proposals
  depth_reach: jax.Array   # float32 [K] its denominators (0: no proposal reached depth k)


class EStepOut(NamedTuple):
  """One batch's E-step (VSD_METHOD.md section 4); A = B*M anchor rows, in batch-major order."""
  paths: DraftPaths        # [B, M, S, K] proposals z ~ q_old (ids under stop_gradient); logits [.., K, N] and
                           # logq keep their gradients: the M-step differentiates the same unroll
  oracle: OracleOutputs    # [B, M, S, K] the target's reduced p_k along them (draft_logits [.., K, N] with CAR)
  anchor_ok: jax.Array     # float32 [A] 1 on anchors that exist
  accept: jax.Array        # float32 [A, S, K] a_k
  utility: jax.Array       # float32 [A, S] U(z) (0 on anchors that do not exist)
  posterior: estep.EStep   # weights float32 [A, S] over the proposals, supported/accept_rate/ess [A]
  realised: jax.Array      # int32 [A, S] realised accepted length L (one shared uniform per token)
  depth_accept: jax.Array  # float32 [K] this batch's per-depth acceptance c_k over the proposals
  depth_reach: jax.Array   # float32 [K] its denominators (0: no proposal reached depth k)


class MStepLoss(NamedTuple):
  """The M-step objective (VSD_METHOD.md section 5), scalars."""
  total: jax.Array         # arw + lambda_car * car + mu * eagle3: what the trainer differentiates
  arw: jax.Array           # Adaptive Rejection Weighting on the weighted sample (plain EM likelihood with arw off)
  car: jax.Array           # Confidence-Aware Regularization (0 with lambda_car = 0)
  eagle3: jax.Array        # EAGLE-3's TTT loss (0 with mu = 0)
  eagle3_metrics: dict     # its metrics (`eagle3_loss`), {} with mu = 0


class Monitors(NamedTuple):
  """Training-time monitors (VSD_METHOD.md section 7), scalars unless shown; anchor means over existing anchors."""
  mean_u: jax.Array        # E_q[U] over the proposals: tau_chain - 1
  log_mean_u: jax.Array    # log E_q[U]: the batch-level estimate of J
  kappa: jax.Array         # E_q[prod_k a_k]: full-path acceptance
  elbo: jax.Array          # mean over supported anchors of E_w[log U] - KL(w || uniform over the proposals)
  supported: jax.Array     # fraction of anchors with some U > 0
  chain_accept: jax.Array  # MH moves accepted per proposal, over supported anchors (1 for snis)
  ess_frac: jax.Array      # effective sample size of the snis weights / S, over supported anchors
  anchors: jax.Array       # number of existing anchors
  c: jax.Array             # float32 [K] this batch's per-depth acceptance
  c_ema: jax.Array         # float32 [K] the EMA ARW used (read before this batch's update)

  def scalars(self) -> dict:
    """Flat scalar metrics for the trainer: every field, the [K] ones as c_1.. / c_ema_1.."""
    out = {k: x for k, x in self._asdict().items() if k not in ("c", "c_ema")}
    for k in range(self.c.shape[0]):
      out[f"c_{k + 1}"] = self.c[k]
      out[f"c_ema_{k + 1}"] = self.c_ema[k]
    return out


def batch_pass(v: VsdSettings, target_model, draft, params, frozen: dict, batch: dict, rng: jax.Array) -> BatchPass:
  """The target's pass (with the oracle's cache slots), M anchors per sequence (rng), the draft's step 0.
  batch: input_ids int32 [B, T], attention_mask / loss_mask [B, T] (pixel_values of a multimodal batch)."""
  ids = batch["input_ids"]
  valid = batch["attention_mask"].astype(bool)
  t = ids.shape[1]
  k, s, m = v.depth, v.num_paths, v.num_anchors
  tp = target_pass(target_model, frozen["target"], ids, valid, cache_slots=oracle_slots(t, m, s, k),
                   **image_inputs(batch))  # a LLaVA batch's images: the multimodal prefill
  loss_mask = drop_image_tokens(batch["loss_mask"], ids, target_model.cfg)  # never an image token (LLaVA)
  anchors, ok = choose_anchors(loss_mask, valid, m, rng)
  step0 = sequence_step(draft, params, embedding_matrix(frozen["target"]), tp.features, ids, valid)
  return BatchPass(ids, valid, loss_mask, tp, step0, anchors, ok)


def sample_chains(v: VsdSettings, target_model, draft, params, frozen: dict, bp: BatchPass, rngs: tuple,
                  car: bool) -> ChainSample:
  """S proposals per anchor from q_old (this step's q, ids under stop_gradient), the oracle over all of them,
  acceptance, utility, realised lengths and per-depth acceptance. rngs: PRNG keys (paths, realised-length
  uniforms). car: the oracle also returns the target's logits at the draft vocabulary (CAR reads them)."""
  r_paths, r_u = rngs
  k_max, s = v.depth, v.num_paths
  b, t = bp.ids.shape
  rows = b * v.num_anchors
  d2t = frozen["d2t"].astype(jnp.int32)
  embed = embedding_matrix(frozen["target"])
  paths = unroll_draft_paths(params, draft, embed, bp.target.features, bp.ids, bp.valid, bp.anchors, d2t,
                             num_paths=s, depth=k_max, temperature=v.draft_temperature, rng=r_paths,
                             step0=bp.step0)
  stochastic = v.accept_mode == "stochastic"
  p = oracle_outputs(target_model, frozen["target"], bp.target.kv_cache, t, bp.target.logits, bp.valid, bp.anchors,
                     paths.tokens, temperature=v.accept_temperature if stochastic else 1.0,
                     draft_ids=draft_vocab_ids(d2t) if car else None)
  q_tok = jnp.exp(jax.lax.stop_gradient(paths.logq))
  a = utility.acceptance(v.accept_mode, paths.tokens, q_tok, p.argmax, p.token_prob).reshape(rows, s, k_max)
  anchor_ok = bp.ok.reshape(rows).astype(jnp.float32)
  u = utility.utility(a, v.utility) * anchor_ok[:, None]
  realised = utility.accepted_length(a, jax.random.uniform(r_u, a.shape))
  depth_c, reach = utility.depth_acceptance(a.reshape(rows * s, k_max), jnp.repeat(anchor_ok, s))
  return ChainSample(paths, p, anchor_ok, a, u, realised, depth_c, reach)


def e_step(v: VsdSettings, target_model, draft, params, frozen: dict, bp: BatchPass, rngs: tuple) -> EStepOut:
  """The chains (`sample_chains`) and their posterior weights (config.vsd.estep).
  rngs: PRNG keys (paths, chain, realised-length uniforms)."""
  r_paths, r_chain, r_u = rngs
  ch = sample_chains(v, target_model, draft, params, frozen, bp, (r_paths, r_u), car=v.lambda_car > 0)
  est = estep.estep_weights(ch.utility, r_chain, v.estep, v.burn_in)
  est = est._replace(weights=est.weights * ch.anchor_ok[:, None])
  return EStepOut(ch.paths, ch.oracle, ch.anchor_ok, ch.accept, ch.utility, est, ch.realised, ch.depth_accept,
                  ch.depth_reach)


def eagle3_term(d: DraftSettings, draft, params, frozen: dict, bp: BatchPass) -> tuple:
  """EAGLE-3's TTT loss on the batch pass (its features and logits, the draft's step 0): (loss, metrics)."""
  embed = embedding_matrix(frozen["target"])
  return eagle3_loss(params, draft, embed, bp.target.features, bp.ids, bp.target.logits, bp.loss_mask,
                     frozen["t2d"], frozen["d2t"].astype(jnp.int32), attention_mask=bp.valid, step0=bp.step0,
                     **d.ttt_loss_options())


def m_step_loss(v: VsdSettings, d: DraftSettings, draft, params, frozen: dict, bp: BatchPass, e: EStepOut,
                c_ema: jax.Array) -> MStepLoss:
  """ARW on the E-step's weighted sample, CAR on the proposals' reachable positions (k <= L + 1), mu * EAGLE-3.
  c_ema: float32 [K] the per-depth acceptance EMA before this batch (ARW's rejection strength eta_k)."""
  rows, s, k_max = e.accept.shape
  logq = e.paths.logq.reshape(rows, s, k_max)
  if v.arw:
    eta_k = mstep.rejection_strength(c_ema, v.eta, v.eta_max)
    like, unlike = mstep.arw_token_weights(e.realised, e.accept, eta_k, rho0=v.rho0, rho=v.rho, gamma=v.gamma)
  else:  # the plain EM M-step: likelihood of every token of the E-step sample
    like = jnp.broadcast_to(v.gamma ** jnp.arange(k_max, dtype=jnp.float32), e.accept.shape)
    unlike = jnp.zeros_like(e.accept)
  loss_arw = mstep.weighted_path_loss(logq, like, unlike, e.posterior.weights,
                                      num_anchors=jnp.sum(e.anchor_ok) if v.arw_norm == "all" else None)
  total = loss_arw
  loss_car = jnp.zeros(())
  if v.lambda_car > 0:
    visited = (jnp.arange(1, k_max + 1)[None, None, :] <= e.realised[..., None] + 1) * e.anchor_ok[:, None, None]
    loss_car = mstep.car_loss(e.paths.logits.reshape(rows, s, k_max, -1),
                              e.oracle.draft_logits.reshape(rows, s, k_max, -1),
                              e.oracle.top_logp.reshape(rows, s, k_max), visited, v.car_beta)
    total = total + v.lambda_car * loss_car
  loss_e3, m3 = jnp.zeros(()), {}
  if v.mu > 0:
    loss_e3, m3 = eagle3_term(d, draft, params, frozen, bp)
    total = total + v.mu * loss_e3
  return MStepLoss(total, loss_arw, loss_car, loss_e3, m3)


def mean_utility(u: jax.Array, anchor_ok: jax.Array) -> jax.Array:
  """E_q[U] over the proposals of the existing anchors: u float32 [A, S] (0 on missing anchors), anchor_ok [A]."""
  return jnp.sum(u) / (jnp.maximum(jnp.sum(anchor_ok), 1.0) * u.shape[1])


def monitors(e: EStepOut, c_ema: jax.Array) -> Monitors:
  """The E-step's monitors (all under stop_gradient in effect: they read no differentiable quantity)."""
  rows, s, _ = e.accept.shape
  okf = e.anchor_ok
  anchors_n = jnp.maximum(jnp.sum(okf), 1.0)
  mean_u = mean_utility(e.utility, okf)
  sup = e.posterior.supported.astype(jnp.float32) * okf
  sup_n = jnp.maximum(jnp.sum(sup), 1.0)
  return Monitors(
      mean_u=mean_u,
      log_mean_u=jnp.log(jnp.maximum(mean_u, 1e-9)),
      kappa=jnp.sum(utility.full_acceptance(e.accept) * okf[:, None]) / (anchors_n * s),
      elbo=jnp.sum(estep.elbo_estimate(e.utility, e.posterior.weights) * sup) / sup_n,
      supported=jnp.sum(sup) / anchors_n,
      chain_accept=jnp.sum(e.posterior.accept_rate * sup) / sup_n,
      ess_frac=jnp.sum(estep.snis_weights(e.utility).ess * sup) / (sup_n * s),
      anchors=jnp.sum(okf),
      c=e.depth_accept,
      c_ema=c_ema)


def make_vsd_loss(config, target, draft):
  """loss_fn(params, frozen, batch, rng, method_state) -> (loss, (metrics, new method_state)).
  config: a ConfigDict (resolved here) or a `vsd_jax.resolved.Resolved`; estep "exact" is `exact.make_exact_loss`."""
  settings = as_resolved(config)
  v, d = settings.vsd, settings.draft
  if v.estep == "exact":
    from vsd_jax.methods.vsd.exact import make_exact_loss
    return make_exact_loss(settings, target, draft)
  model = target.model

  def loss_fn(params, frozen, batch, rng, method_state):
    r_anchor, r_paths, r_chain, r_u = jax.random.split(rng, 4)
    c_ema = mstep.acceptance_from_ema(method_state)

    def parts(p):
      """(mu * EAGLE-3, ARW + lambda_car * CAR), (metrics, new method state)."""
      bp = batch_pass(v, model, draft, p, frozen, batch, r_anchor)
      e = e_step(v, model, draft, p, frozen, bp, (r_paths, r_chain, r_u))
      new_state = mstep.update_acceptance_ema(method_state, e.depth_accept, e.depth_reach > 0, v.ema_decay)
      m = m_step_loss(v, d, draft, p, frozen, bp, e, c_ema)
      metrics = scalar_metrics(m.eagle3_metrics) if m.eagle3_metrics else {}
      metrics.update(loss_arw=m.arw, loss_car=m.car, loss_eagle3=m.eagle3, **monitors(e, c_ema).scalars())
      anchor = v.mu * m.eagle3
      return (anchor, m.total - anchor), (metrics, new_state)

    if v.eagle3_grad_share > 0:  # the EAGLE-3 term keeps this share of the gradient norm (methods/grad_share.py)
      (anchor, extra), aux = hold_share(parts, params, v.eagle3_grad_share)
    else:
      (anchor, extra), aux = parts(params)
    return anchor + extra, aux

  return loss_fn


def make_heldout_metrics(config, target, draft):
  """metrics_fn(params, frozen, batch, rng) -> {name: scalar}: what the held-out report measures, the same for every
  method and E-step: EAGLE-3's per-step metrics (`scalar_metrics`: acc_k, num_tokens, ...) under teacher forcing, and
  the draft's own chains as VSD samples them (config.vsd: depth, paths, anchors, accept_mode): mean_u = E_q[U],
  anchors (existing anchors), c_1..c_K per-depth acceptance. One target pass gives both.
  config: a ConfigDict or a `vsd_jax.resolved.Resolved`. batch as the trainer's (input_ids int32 [B, T], ...)."""
  settings = as_resolved(config)
  v, d = settings.vsd, settings.draft
  model = target.model

  def metrics_fn(params, frozen, batch, rng):
    r_anchor, r_paths, _, r_u = jax.random.split(rng, 4)   # the training step's split: the same chains
    bp = batch_pass(v, model, draft, params, frozen, batch, r_anchor)
    ch = sample_chains(v, model, draft, params, frozen, bp, (r_paths, r_u), car=False)
    _, m3 = eagle3_term(d, draft, params, frozen, bp)
    out = scalar_metrics(m3)
    out.update(mean_u=mean_utility(ch.utility, ch.anchor_ok), anchors=jnp.sum(ch.anchor_ok))
    out.update({f"c_{k + 1}": ch.depth_accept[k] for k in range(v.depth)})
    return out

  return metrics_fn

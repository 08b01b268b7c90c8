"""EAGLE-3 training objective: the training-time-test (TTT) unroll and soft cross-entropy vs the target.

Alignment (row t of a sequence of T tokens x_0..x_{T-1}; step k = 0..num_steps-1):

    draft input    hidden: step 0 fc(features[t]); step k > 0 the draft's own output of step k-1, row t
                   token:  x_{t+1+k}                      RoPE position: positions[t] + k
    prediction     the distribution of x_{t+2+k}
    soft label     softmax over the draft vocabulary of target_logits[t+1+k]  (the target's next-token
                   distribution given the true prefix x_{<=t+1+k})
    counted iff    row t is a valid (non-padding) token, t+2+k < T, loss_mask[t+2+k] (x_{t+2+k} is a
                   response token) and the target's argmax at t+1+k is in the draft vocabulary (t2d)

This is a chain of length num_steps drafted from the context x_{<=t+1}, with the true tokens fed back
(teacher forcing) and the draft's own hidden states, exactly what decoding does at tree depth k.

TTT attention at step k: query row t sees the step-0 keys of rows j <= t (causal, valid tokens only) and,
for each earlier step i = 1..k, the step-i key of its own row t (its ancestors in the chain). Step 0 writes
slots 0..T-1 of one draft KV cache, step i >= 1 writes row t at slot T + (i-1)*T + t; every step is the
draft's ordinary cached call, and steps 1.. are `vsd_jax.models.draft_unroll.unroll_chain` (one `lax.scan`,
the recursion VSD's path sampling and chain decoding run): the same attention path as decoding.

Draft vocabulary maps (as EAGLE-3): t2d bool [V] marks the target ids in the draft vocabulary; d2t int [N]
maps draft id i to target id i + d2t[i].
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vsd_jax.models.draft_unroll import (chain_slots, draft_fn_of, left_shifter, sequence_step, unroll_chain,
                                         with_slots)
from vsd_jax.models.draft_vocab import draft_to_target, draft_vocab_ids
from vsd_jax.models.eagle3 import Eagle3Draft
from vsd_jax.models.masks import positions_from_mask
from vsd_jax.resolved import OBJECTIVES  # config.draft.objective: the per-step objective of the TTT loss


class TTTRows(NamedTuple):
  """Per-row, per-step quantities of the TTT unroll, each float32 [K, B, T] (K = num_steps; row t, step k
  predicts the data token y = x_{t+2+k}). What VSD's exact objective (`vsd_jax.methods.vsd.exact`) reads."""
  ce: jax.Array          # soft cross-entropy of step k vs the target (EAGLE-3's per-row loss), 0 where not counted
  ce_counted: jax.Array  # 1 where EAGLE-3 counts the row's CE (exists and the target's argmax is in the vocabulary)
  logq_data: jax.Array   # log q_k(y): the draft's log-probability of the data token (-inf outside its vocabulary)
  greedy: jax.Array      # 1 where y is the target's argmax at that prefix (greedy decoding would accept it)
  overlap: jax.Array     # alpha_k = sum_v min(p_k(v), q_k(v)) over the draft vocabulary (p renormalised there)
  exists: jax.Array      # 1 where y is a response token of a valid row (the row/step exists)


class SoftLabels(NamedTuple):
  """What EAGLE-3's loss reads from the target's logits: storable per token instead of [V] logits."""
  draft_logits: jax.Array   # [B, T, N] the target's logits at the draft-vocabulary ids
  target_top: jax.Array     # int32 [B, T] the target's argmax (target id)
  top_in_draft: jax.Array   # bool [B, T] that argmax is in the draft vocabulary
  draft_mass: jax.Array     # float32 [B, T] the target's probability mass on the draft vocabulary (its softmax over
                            # [V] summed at the draft ids): what turns the renormalised p back into p's own values


def soft_labels(target_logits: jax.Array, t2d: jax.Array, d2t: jax.Array) -> SoftLabels:
  """[B, T, V] target logits -> SoftLabels over the draft vocabulary (t2d bool [V], d2t int32 [N])."""
  if t2d.shape != target_logits.shape[2:]:
    raise ValueError(f"eagle3_loss: target_logits {target_logits.shape} and t2d {t2d.shape} disagree on the "
                     "target vocabulary (expected [B, T, V] and [V])")
  target_logits = jax.lax.stop_gradient(target_logits.astype(jnp.float32))
  top = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
  draft_logits = jnp.take(target_logits, draft_vocab_ids(d2t), axis=-1)
  mass = jnp.exp(jax.nn.logsumexp(draft_logits, axis=-1) - jax.nn.logsumexp(target_logits, axis=-1))
  return SoftLabels(draft_logits, top, t2d.astype(bool)[top], mass)




def acceptance_rate(p: jax.Array, q: jax.Array) -> jax.Array:
  """Speculative sampling's acceptance probability of one draft token, sum_v min(p(v), q(v)) over the last axis
  (= 1 - total variation(p, q) when both sum to 1). p: the target's probabilities at the draft-vocabulary ids
  (NOT renormalised there: mass outside the draft vocabulary is never accepted); q: the draft's. [..., N] -> [...]"""
  return jnp.sum(jnp.minimum(p, q), axis=-1)


def lk_step_loss(objective: str, kl: jax.Array, alpha: jax.Array, log_alpha: jax.Array, kl_scale: float = 1.0,
                 kl_decay: float = 1.0) -> jax.Array:
  """One TTT step's objective from its mean soft cross-entropy `kl`, mean acceptance rate `alpha` and mean
  log-acceptance `log_alpha` over the step's rows (scalars):

    "kl"         kl                                           (EAGLE-3)
    "lk_alpha"   -log_alpha                                   (LK: the acceptance rate itself, arXiv 2602.23881)
    "lk_lambda"  w * kl + (1 - w) * (1 - alpha),  w = kl_scale * exp(-kl_decay * alpha) held constant
                 (LK's hybrid: KL's dense gradient while acceptance is low, acceptance once it rises)
  """
  if objective == "kl":
    return kl
  if objective == "lk_alpha":
    return -log_alpha
  if objective == "lk_lambda":
    w = kl_scale * jnp.exp(-kl_decay * jax.lax.stop_gradient(alpha))
    return w * kl + (1.0 - w) * (1.0 - alpha)
  raise ValueError(f"draft.objective={objective!r}; use one of {OBJECTIVES}")


def ttt_unroll(draft_params, draft_module: Eagle3Draft, embed_matrix: jax.Array, features: jax.Array,
               input_ids: jax.Array, num_steps: int = 7, attention_mask: Optional[jax.Array] = None,
               step_fn: Optional[Callable] = None, step0=None):
  """Run the num_steps TTT steps (see the module docstring); returns step_fn's outputs stacked over steps.

  Step 0 is the draft over the sequence (`draft_unroll.sequence_step`); steps 1.. are one chain per row,
  teacher-forced, through `draft_unroll.unroll_chain` (a `lax.scan`, the recursion decoding runs).

  Args:
    draft_params: the draft's "params" collection.
    draft_module: Eagle3Draft (static).
    embed_matrix: [V, H] the target's embedding (frozen).
    features: [B, T, 3H] target features (`vsd_jax.models.features.target_pass`).
    input_ids: int32 [B, T] the sequence (unshifted; the shifts are done here).
    num_steps: static number of unrolled steps.
    attention_mask: bool [B, T] valid (non-padding) tokens; default all valid.
    step_fn: (k int32 [], logits float32 [B, T, N]) -> pytree; default returns the logits.
    step0: the draft's step 0 over this sequence (`draft_unroll.sequence_step`), when the caller has it.
  Returns:
    step_fn's outputs with a leading [num_steps] axis.
  """
  b, t = input_ids.shape
  valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  slots = chain_slots(t, t, num_steps)
  out0 = (sequence_step(draft_module, draft_params, embed_matrix, features, input_ids, valid, slots)
          if step0 is None else with_slots(step0, slots))
  ids_after = left_shifter(input_ids)
  teacher = lambda k, logits, key: (ids_after(2 + k), None)  # z_{k+1}: the true token
  chain = unroll_chain(draft_fn_of(draft_module, draft_params, embed_matrix, out0.image_vector), out0.kv_cache,
                       out0.logits, out0.hidden, positions_from_mask(valid),
                       jnp.broadcast_to(jnp.arange(1, t + 1), (b, t)),
                       jnp.full((b,), t, jnp.int32), depth=num_steps, choose=teacher, reduce=step_fn,
                       key_valid=valid)
  return chain.reduced


def eagle3_loss(draft_params, draft_module: Eagle3Draft, embed_matrix: jax.Array, features: jax.Array,
                input_ids: jax.Array, target_logits: jax.Array, loss_mask: jax.Array, t2d: jax.Array,
                d2t: jax.Array, num_steps: int = 7, decay: float = 0.8,
                attention_mask: Optional[jax.Array] = None, step0=None, with_rows: bool = False,
                objective: str = "kl", lk_kl_scale: float = 1.0, lk_kl_decay: float = 1.0):
  """EAGLE-3 TTT loss: sum_k decay^k * (objective of step k vs the target). Pure and jittable.

  The step objective is EAGLE-3's soft cross-entropy (objective "kl") or an LK loss on the step's expected
  acceptance rate (`lk_step_loss`; static strings/floats).

  target_logits may be the full [B, T, V] logits or their `SoftLabels` (precomputed features mode).

  Args:
    draft_params: the draft's "params" collection (the only thing differentiated).
    draft_module: Eagle3Draft (static).
    embed_matrix: [V, H] the target's embedding (frozen).
    features: [B, T, 3H] target features; target_logits: [B, T, V] (both from `target_features`).
    input_ids: int32 [B, T].
    loss_mask: [B, T] (bool or 0/1): 1 where the token is a response token the draft learns to predict.
    t2d: bool [V]; d2t: int32 [N] (draft id i -> target id i + d2t[i]).
    num_steps: static number of TTT steps; decay: step weight base (weight decay**k).
    attention_mask: bool [B, T] valid tokens; default all valid.
    step0: optional precomputed step 0 (see `ttt_unroll`).
    with_rows: also return metrics["rows"], the per-row `TTTRows` [num_steps, B, T] (static flag).
  Returns:
    (loss scalar, metrics) with metrics = {
      "step_loss": [num_steps] each step's objective: for "kl" the mean soft CE over its counted rows,
      "step_acc": [num_steps] top-1 agreement: draft argmax (mapped to a target id) == target argmax, over
        the rows whose predicted token is a loss token (target argmax outside the draft vocab = a miss),
      "step_alpha": [num_steps] mean acceptance rate sum_v min(p, q) over those rows (p not renormalised),
      "tau": simulated accepted length 1 + sum_k prod_{i<=k} step_acc[i],
      "num_tokens": rows counted at step 0 }.
    A step with no counted row has loss 0 and accuracy 0.
  """
  b, t = input_ids.shape
  n = d2t.shape[0]
  if objective not in OBJECTIVES:
    raise ValueError(f"draft.objective={objective!r}; use one of {OBJECTIVES}")
  if n != draft_module.cfg.draft_vocab_size:
    raise ValueError(f"eagle3_loss: d2t has {n} entries but the draft vocabulary has "
                     f"{draft_module.cfg.draft_vocab_size}; build both from the same draft vocab")
  labels = target_logits if isinstance(target_logits, SoftLabels) else soft_labels(target_logits, t2d, d2t)
  if labels.draft_logits.shape != (b, t, n):
    raise ValueError(f"eagle3_loss: target labels {labels.draft_logits.shape} do not match input_ids "
                     f"{input_ids.shape} and the {n}-token draft vocabulary")
  valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  d2t = d2t.astype(jnp.int32)
  target_top, top_in_draft = labels.target_top, labels.top_in_draft
  target_p = jax.nn.softmax(jax.lax.stop_gradient(labels.draft_logits.astype(jnp.float32)), axis=-1)  # [B, T, N]
  is_loss_token = loss_mask.astype(bool) & valid

  p_at, top_at, loss_at, in_draft_at, ids_at, mass_at = map(
      left_shifter, (target_p, target_top, is_loss_token, top_in_draft, input_ids.astype(jnp.int32),
                     labels.draft_mass.astype(jnp.float32)))
  # target id -> draft id (-1 outside the draft vocabulary), for log q of the data token
  to_draft = jnp.where(t2d.astype(bool), jnp.cumsum(t2d.astype(jnp.int32)) - 1, -1)

  def step_stats(k, logits):
    p = p_at(1 + k)
    top = top_at(1 + k)
    predicts_loss_token = loss_at(2 + k) & valid                                         # [B, T]
    counted = predicts_loss_token & in_draft_at(1 + k)
    logq = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.sum(p * logq, axis=-1)                                                     # [B, T]
    num = jnp.sum(counted)
    kl = jnp.sum(jnp.where(counted, ce, 0.0)) / jnp.maximum(num, 1)
    pred = jnp.argmax(logits, axis=-1)
    hit = predicts_loss_token & (draft_to_target(pred, d2t) == top)
    rows = jnp.maximum(jnp.sum(predicts_loss_token), 1)
    step_acc = jnp.sum(hit) / rows
    alpha_rows = acceptance_rate(p * mass_at(1 + k)[..., None], jnp.exp(logq))                     # [B, T]
    alpha = jnp.sum(jnp.where(predicts_loss_token, alpha_rows, 0.0)) / rows
    log_alpha = jnp.sum(jnp.where(predicts_loss_token, jnp.log(jnp.maximum(alpha_rows, 1e-20)), 0.0)) / rows
    step_loss = lk_step_loss(objective, kl, alpha, log_alpha, lk_kl_scale, lk_kl_decay)
    out = (step_loss, jax.lax.stop_gradient(step_acc), num, jax.lax.stop_gradient(alpha))
    if not with_rows:
      return out
    y = ids_at(2 + k)                                                                    # the data token
    yd = to_draft[y]
    logq_y = jnp.where(yd >= 0, jnp.take_along_axis(logq, jnp.maximum(yd, 0)[..., None], axis=-1)[..., 0],
                       -jnp.inf)
    overlap = acceptance_rate(p, jnp.exp(logq))
    f = lambda x: x.astype(jnp.float32)
    return out + (TTTRows(jnp.where(counted, ce, 0.0), f(counted), logq_y, f((top == y) & (yd >= 0)), overlap,
                          f(predicts_loss_token)),)

  unrolled = ttt_unroll(draft_params, draft_module, embed_matrix, features, input_ids, num_steps, attention_mask,
                        step_fn=step_stats, step0=step0)
  step_loss, step_acc, num, step_alpha = unrolled[:4]
  step_acc = step_acc.astype(jnp.float32)
  weights = jnp.asarray(decay, jnp.float32) ** jnp.arange(num_steps, dtype=jnp.float32)
  loss = jnp.sum(weights * step_loss)
  metrics = {"step_loss": step_loss, "step_acc": step_acc, "step_alpha": step_alpha,
             "tau": 1.0 + jnp.sum(jnp.cumprod(step_acc)), "num_tokens": num[0]}
  if with_rows:
    metrics["rows"] = unrolled[4]
  return loss, metrics


def validate_vocab_maps(t2d, d2t, vocab_size: int) -> None:
  """Host-side check that t2d [V] and d2t [N] describe the same sorted draft vocabulary; raises ValueError."""
  t2d, d2t = np.asarray(t2d), np.asarray(d2t)
  if t2d.shape != (vocab_size,) or t2d.dtype != np.bool_:
    raise ValueError(f"t2d must be bool [{vocab_size}] (the target vocab); got {t2d.dtype} {t2d.shape}")
  ids = draft_vocab_ids(d2t)
  if ids.min(initial=0) < 0 or ids.max(initial=0) >= vocab_size:
    raise ValueError("d2t maps draft ids outside the target vocabulary; rebuild the draft vocab maps")
  if not np.array_equal(np.flatnonzero(t2d), ids):
    raise ValueError(f"t2d ({int(t2d.sum())} tokens) and d2t ({d2t.shape[0]} tokens) describe different draft "
                     "vocabularies (d2t must list the t2d tokens in increasing order); rebuild both together")

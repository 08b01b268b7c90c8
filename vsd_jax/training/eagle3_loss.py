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
for each earlier step i = 1..k, the step-i key of its own row t (one diagonal entry per step; its
ancestors in the chain). The keys/values of steps 0..k are concatenated as slots [i*T, (i+1)*T) of a
draft KV cache and attended through the draft's ordinary cached call with the mask
`ttt_attention_mask`: the same attention path as decoding, no second implementation.

Draft vocabulary maps (as EAGLE-3): t2d bool [V] marks the target ids in the draft vocabulary; d2t int [N]
maps draft id i to target id i + d2t[i].
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vsd_jax.data.draft_vocab import draft_to_target
from vsd_jax.models.eagle3 import Eagle3Draft, init_draft_cache
from vsd_jax.models.kv_cache import KVCache


def positions_from_mask(valid: jax.Array) -> jax.Array:
  """RoPE positions int32 [B, T] of a (left- or right-) padded batch: index among the valid tokens."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def sequence_mask(valid: jax.Array, num_slots: int) -> jax.Array:
  """bool [B, T, S]: a sequence at slots 0..T-1 of S >= T slots, causal over its valid tokens. valid: [B, T]."""
  t = valid.shape[1]
  key_valid = jnp.pad(valid.astype(bool), ((0, 0), (0, num_slots - t)))          # [B, S]
  return (jnp.arange(num_slots)[None, :] <= jnp.arange(t)[:, None])[None] & key_valid[:, None, :]


def shift_left(x: jax.Array, n: int) -> jax.Array:
  """x[:, n:] padded at the end with zeros (False) back to length T. x: [B, T, ...]."""
  pad = [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x[:, n:], pad)


def ttt_attention_mask(seq_len: int, step: int, key_valid: Optional[jax.Array] = None) -> jax.Array:
  """Mask of TTT step `step` over the concatenated keys of steps 0..step.

  Query row t sees slot i*T + j iff (i == 0 and j <= t and key_valid[j]) or (1 <= i <= step and j == t).
  key_valid: bool [B, T] (default all valid). Returns bool [B, T, (step+1)*T] ([1, ...] without key_valid).
  """
  t = seq_len
  rows = jnp.arange(t)[:, None]
  cols = jnp.arange(t)[None, :]
  causal = (cols <= rows)[None]  # [1, T, T]
  if key_valid is not None:
    causal = causal & key_valid.astype(bool)[:, None, :]
  diag = jnp.broadcast_to((cols == rows)[None], causal.shape[:1] + (t, t))
  return jnp.concatenate([causal] + [diag] * step, axis=-1)


class SoftLabels(NamedTuple):
  """What EAGLE-3's loss reads from the target's logits: storable per token instead of [V] logits."""
  draft_logits: jax.Array   # [B, T, N] the target's logits at the draft-vocabulary ids
  target_top: jax.Array     # int32 [B, T] the target's argmax (target id)
  top_in_draft: jax.Array   # bool [B, T] that argmax is in the draft vocabulary


def soft_labels(target_logits: jax.Array, t2d: jax.Array, d2t: jax.Array) -> SoftLabels:
  """[B, T, V] target logits -> SoftLabels over the draft vocabulary (t2d bool [V], d2t int32 [N])."""
  if t2d.shape != target_logits.shape[2:]:
    raise ValueError(f"eagle3_loss: target_logits {target_logits.shape} and t2d {t2d.shape} disagree on the "
                     "target vocabulary (expected [B, T, V] and [V])")
  target_logits = jax.lax.stop_gradient(target_logits.astype(jnp.float32))
  top = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
  ids = draft_to_target(jnp.arange(d2t.shape[0], dtype=jnp.int32), d2t.astype(jnp.int32))
  return SoftLabels(jnp.take(target_logits, ids, axis=-1), top, t2d.astype(bool)[top])


def ttt_unroll(draft_params, draft_module: Eagle3Draft, embed_matrix: jax.Array, features: jax.Array,
               input_ids: jax.Array, num_steps: int = 7, attention_mask: Optional[jax.Array] = None,
               step_fn: Optional[Callable] = None) -> list:
  """Run the num_steps TTT steps (see the module docstring); returns [step_fn(k, logits_k) for each k].

  Args:
    draft_params: the draft's "params" collection.
    draft_module: Eagle3Draft (static).
    embed_matrix: [V, H] the target's embedding (frozen).
    features: [B, T, 3H] target features (`target_features`).
    input_ids: int32 [B, T] the sequence (unshifted; the shifts are done here).
    num_steps: static number of unrolled steps.
    attention_mask: bool [B, T] valid (non-padding) tokens; default all valid.
    step_fn: (k, logits float32 [B, T, N]) -> any pytree; default returns the logits.
  """
  b, t = input_ids.shape
  cfg = draft_module.cfg
  valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  positions = positions_from_mask(valid)
  step_fn = step_fn or (lambda k, logits: logits)
  hidden, cache, results = features, None, []
  for k in range(num_steps):
    fresh = init_draft_cache(cfg, b, t)
    cache = fresh if cache is None else KVCache(jnp.concatenate([cache.k, fresh.k], axis=3),
                                                jnp.concatenate([cache.v, fresh.v], axis=3))
    out = draft_module.apply(
        {"params": draft_params}, embed_matrix, shift_left(input_ids, 1 + k), hidden, positions + k,
        ttt_attention_mask(t, k, valid), cache, jnp.full((b,), k * t, jnp.int32))
    hidden, cache = out.hidden, out.kv_cache
    results.append(step_fn(k, out.logits))
  return results


def eagle3_loss(draft_params, draft_module: Eagle3Draft, embed_matrix: jax.Array, features: jax.Array,
                input_ids: jax.Array, target_logits: jax.Array, loss_mask: jax.Array, t2d: jax.Array,
                d2t: jax.Array, num_steps: int = 7, decay: float = 0.8,
                attention_mask: Optional[jax.Array] = None):
  """EAGLE-3 TTT loss: sum_k decay^k * (soft cross-entropy of step k vs the target). Pure and jittable.

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
  Returns:
    (loss scalar, metrics) with metrics = {
      "step_loss": [num_steps] mean soft CE over the counted rows of each step,
      "step_acc": [num_steps] top-1 agreement: draft argmax (mapped to a target id) == target argmax, over
        the rows whose predicted token is a loss token (target argmax outside the draft vocab = a miss),
      "tau": simulated accepted length 1 + sum_k prod_{i<=k} step_acc[i],
      "num_tokens": rows counted at step 0 }.
    A step with no counted row has loss 0 and accuracy 0.
  """
  b, t = input_ids.shape
  n = d2t.shape[0]
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

  def step_stats(k, logits):
    p = shift_left(target_p, 1 + k)
    top = shift_left(target_top, 1 + k)
    predicts_loss_token = shift_left(is_loss_token, 2 + k) & valid                       # [B, T]
    counted = predicts_loss_token & shift_left(top_in_draft, 1 + k)
    ce = -jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1)                     # [B, T]
    num = jnp.sum(counted)
    step_loss = jnp.sum(jnp.where(counted, ce, 0.0)) / jnp.maximum(num, 1)
    pred = jnp.argmax(logits, axis=-1)
    hit = predicts_loss_token & (draft_to_target(pred, d2t) == top)
    step_acc = jnp.sum(hit) / jnp.maximum(jnp.sum(predicts_loss_token), 1)
    return step_loss, jax.lax.stop_gradient(step_acc), num

  stats = ttt_unroll(draft_params, draft_module, embed_matrix, features, input_ids, num_steps,
                     attention_mask, step_stats)
  step_loss = jnp.stack([s[0] for s in stats])
  step_acc = jnp.stack([s[1] for s in stats]).astype(jnp.float32)
  weights = jnp.asarray(decay, jnp.float32) ** jnp.arange(num_steps, dtype=jnp.float32)
  loss = jnp.sum(weights * step_loss)
  metrics = {"step_loss": step_loss, "step_acc": step_acc, "tau": 1.0 + jnp.sum(jnp.cumprod(step_acc)),
             "num_tokens": stats[0][2]}
  return loss, metrics


class TargetPass(NamedTuple):
  features: jax.Array           # [B, T, 3H] inputs of cfg.eagle3_layers, concatenated in that order
  logits: jax.Array             # float32 [B, T, V]
  kv_cache: Optional[KVCache]   # the sequence's keys/values at slots 0..T-1 (with cache_slots), else None


def target_pass(target_model, target_params, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                cache_slots: int = 0) -> TargetPass:
  """Run the target once over training sequences. Pure and jittable (target_model, cache_slots static).

  input_ids: int32 [B, T]; attention_mask: bool [B, T] valid tokens (left or right padding), default all.
  cache_slots: 0 = no KV cache; else >= T slots, the sequence written at 0..T-1 (VSD's oracle then
  verifies draft paths against these keys/values). Everything returned is under stop_gradient.
  """
  cfg = target_model.cfg
  b, t = input_ids.shape
  valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  slots = cache_slots or t
  if slots < t:
    raise ValueError(f"target_pass: cache_slots={cache_slots} is below the sequence length {t}")
  mask = sequence_mask(valid, slots)
  cache = KVCache.zeros(cfg, b, slots) if cache_slots else None
  out = target_model.apply({"params": target_params}, input_ids, positions=positions_from_mask(valid),
                           attention_mask=mask, kv_cache=cache,
                           write_index=None if cache is None else jnp.zeros((b,), jnp.int32),
                           hidden_layers=tuple(cfg.eagle3_layers))
  features = jnp.concatenate(list(out.hidden_states), axis=-1)
  return jax.lax.stop_gradient(TargetPass(features, out.logits, out.kv_cache if cache_slots else None))


def target_features(target_model, target_params, input_ids: jax.Array,
                    attention_mask: Optional[jax.Array] = None):
  """(features [B, T, 3H], logits float32 [B, T, V]) of `target_pass` (no cache), for EAGLE-3 training."""
  out = target_pass(target_model, target_params, input_ids, attention_mask)
  return out.features, out.logits


def validate_vocab_maps(t2d, d2t, vocab_size: int) -> None:
  """Host-side check that t2d [V] and d2t [N] describe the same sorted draft vocabulary; raises ValueError."""
  t2d, d2t = np.asarray(t2d), np.asarray(d2t)
  if t2d.shape != (vocab_size,) or t2d.dtype != np.bool_:
    raise ValueError(f"t2d must be bool [{vocab_size}] (the target vocab); got {t2d.dtype} {t2d.shape}")
  ids = np.arange(d2t.shape[0]) + d2t
  if ids.min(initial=0) < 0 or ids.max(initial=0) >= vocab_size:
    raise ValueError("d2t maps draft ids outside the target vocabulary; rebuild the draft vocab maps")
  if not np.array_equal(np.flatnonzero(t2d), ids):
    raise ValueError(f"t2d ({int(t2d.sum())} tokens) and d2t ({d2t.shape[0]} tokens) describe different draft "
                     "vocabularies (d2t must list the t2d tokens in increasing order); rebuild both together")

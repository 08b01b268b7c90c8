"""The target's features as the EAGLE-3 draft reads them: one fusion for training and decoding.

The draft's `fc` reads the *inputs* of the target layers `LlamaConfig.eagle3_layers` (2, L//2, L-3),
concatenated in that order along the hidden axis: [B, T, 3H]. The target returns them stacked as
hidden_states [3, B, T, H]; `fuse_features` is the only place that turns one into the other, so a change of
layout changes training (`target_pass`) and decoding (`vsd_jax.decoding.speculative`) together.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.masks import positions_from_mask, sequence_mask


def fuse_features(hidden_states: jax.Array) -> jax.Array:
  """[n, B, T, H] layer inputs -> [B, T, n*H] the draft's fused-feature input (layer-major along the last axis)."""
  n, b, t, h = hidden_states.shape
  return hidden_states.transpose(1, 2, 0, 3).reshape(b, t, n * h)


class TargetPass(NamedTuple):
  features: jax.Array           # [B, T, 3H] inputs of cfg.eagle3_layers, fused (`fuse_features`)
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
  return jax.lax.stop_gradient(
      TargetPass(fuse_features(out.hidden_states), out.logits, out.kv_cache if cache_slots else None))


def target_features(target_model, target_params, input_ids: jax.Array,
                    attention_mask: Optional[jax.Array] = None):
  """(features [B, T, 3H], logits float32 [B, T, V]) of `target_pass` (no cache), for EAGLE-3 training."""
  out = target_pass(target_model, target_params, input_ids, attention_mask)
  return out.features, out.logits

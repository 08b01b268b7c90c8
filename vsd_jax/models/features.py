"""The target's features as the EAGLE-3 draft reads them: one fusion for training and decoding.

The draft's `fc` reads the *inputs* of the target layers `LlamaConfig.eagle3_layers` (2, L//2, L-3),
concatenated in that order along the hidden axis: [B, T, 3H]. The target returns them stacked as
hidden_states [3, B, T, H]; `fuse_features` is the only place that turns one into the other, so a change of
layout changes training (`target_pass`) and decoding (`vsd_jax.decoding.speculative`) together.

Multimodal targets (LLaVA, models/llava.py): `target_pass` takes the batch's images (pixel_values or
precomputed image features) and runs the one multimodal prefill, so the features at text and image positions
are those of the language model over text embeddings with the image features placed at the image tokens.
The draft reads the *language model's* token embedding; `embedding_matrix` / `language_model_params` are the
one place that knows where it lives in a target's parameters (LLaMA: params["embed_tokens"]; LLaVA:
params["language_model"]["embed_tokens"]).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.masks import positions_from_mask, sequence_mask


IMAGE_KEYS = ("pixel_values", "image_features")  # the batch / call entries that carry a multimodal prompt's images


def language_model_params(target_params) -> dict:
  """The LLaMA language model's parameters of a target: a LlamaForCausalLM's own, or LLaVA's "language_model"."""
  return target_params["language_model"] if "language_model" in target_params else target_params


def embedding_matrix(target_params) -> jax.Array:
  """[V, H] the target's (language model's) token embedding, which the EAGLE-3 draft shares."""
  return language_model_params(target_params)["embed_tokens"]["embedding"]


def output_matrix(target_params, tie_word_embeddings: bool) -> jax.Array:
  """[V, H] the language model's output rows (the tied embedding, or lm_head's kernel transposed)."""
  lm = language_model_params(target_params)
  return lm["embed_tokens"]["embedding"] if tie_word_embeddings else lm["lm_head"]["kernel"].T


def image_inputs(batch) -> dict:
  """The image entries of a batch dict (pixel_values / image_features) that are present and not None, as keyword
  arguments of a multimodal target call (`target_pass`, vanilla.generate, speculative_generate); {} for text."""
  return {k: batch[k] for k in IMAGE_KEYS if k in batch and batch[k] is not None}


def fuse_features(hidden_states: jax.Array) -> jax.Array:
  """[n, B, T, H] layer inputs -> [B, T, n*H] the draft's fused-feature input (layer-major along the last axis)."""
  n, b, t, h = hidden_states.shape
  return hidden_states.transpose(1, 2, 0, 3).reshape(b, t, n * h)


class TargetPass(NamedTuple):
  features: jax.Array           # [B, T, 3H] inputs of cfg.eagle3_layers, fused (`fuse_features`)
  logits: jax.Array             # float32 [B, T, V]
  kv_cache: Optional[KVCache]   # the sequence's keys/values at slots 0..T-1 (with cache_slots), else None


def target_pass(target_model, target_params, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                cache_slots: int = 0, pixel_values: Optional[jax.Array] = None,
                image_features: Optional[jax.Array] = None) -> TargetPass:
  """Run the target once over training sequences. Pure and jittable (target_model, cache_slots static).

  input_ids: int32 [B, T]; attention_mask: bool [B, T] valid tokens (left or right padding), default all.
  cache_slots: 0 = no KV cache; else >= T slots, the sequence written at 0..T-1 (VSD's oracle then
  verifies draft paths against these keys/values). Everything returned is under stop_gradient.
  pixel_values / image_features: a LLaVA target's images of the batch (LlavaForConditionalGeneration's
    arguments: per row [B, I, C, S, S] / [B, I, P, H], or flat in image-token order); the image tokens of
    input_ids get their features (the multimodal prefill). None: text only (any target).
  """
  cfg = target_model.cfg
  b, t = input_ids.shape
  valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
  slots = cache_slots or t
  if slots < t:
    raise ValueError(f"target_pass: cache_slots={cache_slots} is below the sequence length {t}")
  mask = sequence_mask(valid, slots)
  cache = KVCache.zeros(cfg, b, slots) if cache_slots else None
  images = image_inputs(dict(pixel_values=pixel_values, image_features=image_features))
  out = target_model.apply({"params": target_params}, input_ids, positions=positions_from_mask(valid),
                           attention_mask=mask, kv_cache=cache,
                           write_index=None if cache is None else jnp.zeros((b,), jnp.int32),
                           hidden_layers=tuple(cfg.eagle3_layers), **images)
  return jax.lax.stop_gradient(
      TargetPass(fuse_features(out.hidden_states), out.logits, out.kv_cache if cache_slots else None))


def target_features(target_model, target_params, input_ids: jax.Array,
                    attention_mask: Optional[jax.Array] = None, pixel_values: Optional[jax.Array] = None,
                    image_features: Optional[jax.Array] = None):
  """(features [B, T, 3H], logits float32 [B, T, V]) of `target_pass` (no cache), for EAGLE-3 training."""
  out = target_pass(target_model, target_params, input_ids, attention_mask, pixel_values=pixel_values,
                    image_features=image_features)
  return out.features, out.logits

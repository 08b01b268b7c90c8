"""Vanilla autoregressive generation: jitted prefill + `lax.while_loop` decode over a preallocated cache.

Prompts are right-padded: row b's prompt fills slots [0, prompt_lens[b]) and its new tokens follow it,
so slot index == RoPE position in every row and the mask is "slot <= my position".

Multimodal prompts (a LLaVA target): pixel_values / image_features go into the prefill only (the image tokens of
the prompt get their features); every step after it feeds text tokens to the same model, i.e. its language model.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from vsd_jax.decoding.precision import matmul_precision
from vsd_jax.decoding.sampling import sample_token
from vsd_jax.models.features import image_inputs
from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.masks import decode_mask


@flax.struct.dataclass
class GenerateOutput:
  tokens: jax.Array      # int32 [B, max_new_tokens]; pad_id after a row stops
  num_new: jax.Array     # int32 [B] new tokens per row (EOS included when produced)
  rounds: jax.Array      # int32 [B] target forward passes after prefill while the row was running


def is_eos(tokens: jax.Array, eos_ids: tuple) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32))


def prefill(model, params, prompt_ids, prompt_lens, cache: KVCache, **images):
  """Run the prompt through the target, filling the cache. Returns (logits at each row's last prompt
  token float32 [B, V], cache, output). images: a LLaVA target's pixel_values / image_features (see generate)."""
  out = model.apply({"params": params}, prompt_ids, kv_cache=cache, write_index=jnp.zeros_like(prompt_lens),
                    logits_at=prompt_lens - 1, **image_inputs(images))
  return out.logits[:, 0], out.kv_cache, out


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "cache_slots", "eos_ids", "top_p",
                                              "pad_id", "precision"))
def generate(model, params, prompt_ids, prompt_lens, rng, temperature=0.0, *, max_new_tokens: int,
             cache_slots: int, eos_ids: tuple = (), top_p: float = 1.0, pad_id: int = 0,
             precision: Optional[str] = None, pixel_values=None, image_features=None) -> GenerateOutput:
  """Generate up to max_new_tokens per row with one compiled loop, no host round trips.

  Args:
    model: LlamaForCausalLM (static). params: its parameters.
    prompt_ids: int32 [B, P], right-padded. prompt_lens: int32 [B], each in [1, P].
    rng: PRNG key. temperature: float scalar (0 = greedy). top_p: static nucleus mass.
    max_new_tokens, cache_slots (>= P + max_new_tokens), eos_ids, pad_id: static.
    precision: static matmul precision, 'default' | 'high' | 'highest' (decoding/precision.py); None = JAX's.
    pixel_values: a LLaVA target's images, per row float [B, I, C, S, S] (blank padding past a row's count) or
      flat [N, C, S, S] in image-token order; or image_features [B, I, P, H] / [N, P, H]. Used by the prefill
      only. None: a text prompt (any target).
  Returns:
    GenerateOutput with tokens [B, max_new_tokens], num_new [B], rounds [B].
  """
  with matmul_precision(precision):
    return _generate(model, params, prompt_ids, prompt_lens, rng, temperature, max_new_tokens, cache_slots,
                     eos_ids, top_p, pad_id, dict(pixel_values=pixel_values, image_features=image_features))


def _generate(model, params, prompt_ids, prompt_lens, rng, temperature, max_new_tokens, cache_slots, eos_ids,
              top_p, pad_id, images=None) -> GenerateOutput:
  b, p = prompt_ids.shape
  cfg = model.cfg
  cache = KVCache.zeros(cfg, b, cache_slots)
  last_logits, cache, _ = prefill(model, params, prompt_ids, prompt_lens, cache, **(images or {}))
  rng, sub = jax.random.split(rng)
  first = sample_token(last_logits, sub, temperature, top_p)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  done = is_eos(first, eos_ids) | (max_new_tokens <= 1)
  state = dict(i=jnp.int32(1), tokens=tokens, last=first, cache=cache, done=done, rng=rng,
               num_new=jnp.ones((b,), jnp.int32), rounds=jnp.zeros((b,), jnp.int32))

  def cond(s):
    return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

  def body(s):
    pos = prompt_lens + s["i"] - 1  # slot/position of the token being fed
    out = model.apply({"params": params}, s["last"][:, None], positions=pos[:, None],
                      attention_mask=decode_mask(pos, cache_slots),
                      kv_cache=s["cache"], write_index=pos)
    rng, sub = jax.random.split(s["rng"])
    nxt = sample_token(out.logits[:, 0], sub, temperature, top_p)
    running = ~s["done"]
    nxt = jnp.where(running, nxt, pad_id)
    tokens = jax.lax.dynamic_update_slice(s["tokens"], nxt[:, None], (jnp.int32(0), s["i"]))
    return dict(i=s["i"] + 1, tokens=tokens, last=nxt, cache=out.kv_cache, rng=rng,
                done=s["done"] | is_eos(nxt, eos_ids), num_new=s["num_new"] + running,
                rounds=s["rounds"] + running)

  s = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(tokens=s["tokens"], num_new=s["num_new"], rounds=s["rounds"])

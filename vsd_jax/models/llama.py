"""Pure-functional Flax linen LLaMA-family decoder: LLaMA 1/2/3, Vicuna, SmolLM2, Mistral, Qwen2/2.5, Qwen3 (dense).

The variants differ by config fields only (`LlamaConfig`): Qwen2's bias on the q/k/v projections (`qkv_bias`),
Qwen3's per-head RMSNorm of q and k before RoPE (`qk_norm`, with an explicit `head_dim`), Mistral's sliding
window (`sliding_window`, applied to whatever mask the call gets, by `masks.within_window`).

One attention path serves every use: the caller passes explicit RoPE positions, a boolean attention
mask over the key slots and, optionally, a preallocated KV cache plus the slot each row writes its new
keys/values to. Prefill, cached decode, tree verification and the VSD oracle are the same call with
different masks.

Shapes: B batch, T new tokens, S cache slots, L layers, H hidden, Q query heads, KV kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vsd_jax.models.kv_cache import KVCache, write_layer, write_positions
from vsd_jax.models.masks import causal_mask, within_window


class ArchConfig:
  """What every frozen architecture dataclass (LlamaConfig, ClipVisionConfig, Eagle3Config) offers besides its
  fields, which include `dtype` (compute) and `param_dtype` (storage)."""

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw):
    """A copy with the given fields changed."""
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ArchConfig):
  """Architecture of a LLaMA-family decoder. Frozen so it can be a static jit argument."""
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # LLaMA-3 style rope scaling ("llama3") or None.
  rope_scaling_type: Optional[str] = None
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = True
  bos_token_id: int = 1
  eos_token_ids: tuple = (2,)
  qkv_bias: bool = False        # Qwen2/2.5: bias on q_proj, k_proj, v_proj (not o_proj)
  qk_norm: bool = False         # Qwen3: RMSNorm over head_dim of each q and k head, before RoPE
  sliding_window: Optional[int] = None  # Mistral v0.1: a query at position p sees keys at positions > p - window
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = True      # nn.scan over layers: one compiled layer body (fast CPU compiles)

  @property
  def eagle3_layers(self) -> tuple:
    """Target layers whose inputs EAGLE-3 fuses: 2, L//2, L-3."""
    return (2, self.num_layers // 2, self.num_layers - 3)


@flax.struct.dataclass
class LlamaOutput:
  logits: jax.Array                   # float32 [B, T, vocab]
  kv_cache: Optional[KVCache]         # updated cache, when one was passed
  hidden_states: Optional[jax.Array]  # [len(layers), B, T, H]: inputs of the requested layers


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
  """Inverse frequencies [D/2], with LLaMA-3 scaling when configured."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if cfg.rope_scaling_type is None:
    return inv
  if cfg.rope_scaling_type != "llama3":
    raise ValueError(f"rope_scaling_type={cfg.rope_scaling_type!r} is not supported; use None or 'llama3'")
  # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
  low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
  high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv
  smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_scaling_factor, inv)
  mid = (1 - smooth) * inv / cfg.rope_scaling_factor + smooth * inv
  is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(is_mid, mid, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF layout). x: [B, T, heads, D]; positions: int [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def dot_product_attention(q, k, v, mask):
  """The one attention kernel. q: [B,T,Q,D]; k, v: [B,KV,S,D]; mask: bool [B,T,S] -> [B,T,Q,D].

  GQA: the G = Q/KV query heads of a kv head and the T queries form one [G*T, D] matrix per (b, kv head), so
  both products are plain batched matmuls. Softmax in float32; a row with no visible key gives 0.
  """
  b, t, n, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  g = n // kv
  qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
  scores = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  m = jnp.broadcast_to(mask[:, None, None], (b, kv, g, t, s)).reshape(b, kv, g * t, s)
  scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(m, probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
  return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def _dense(features, name, axes, cfg, bias=False):
  return nn.Dense(
      features, use_bias=bias, name=name, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  """GQA self-attention with RoPE over an optional KV cache. Input width may differ from H (EAGLE-3)."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, layer=0, write_index=None):
    """x: [B,T,Hin]; positions: [B,T]; mask: bool [B,T,S]; cache: (k, v) each [L,B,KV,S,D] or None;
    layer: index into the cache; write_index: int [B], slot of each row's first new token.
    Returns ([B,T,H], updated cache or None)."""
    cfg = self.cfg
    b, t, _ = x.shape
    q = _dense(cfg.num_heads * cfg.head_dim, "q_proj", ("embed", "heads"), cfg, cfg.qkv_bias)(x)
    k = _dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", ("embed", "kv_heads"), cfg, cfg.qkv_bias)(x)
    v = _dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", ("embed", "kv_heads"), cfg, cfg.qkv_bias)(x)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if cache is None:
      keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    else:
      cache = (write_layer(cache[0], layer, k, write_index), write_layer(cache[1], layer, v, write_index))
      keys, values = cache[0][layer], cache[1][layer]
    out = dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
    out = _dense(cfg.hidden_size, "o_proj", ("heads", "embed"), cfg)(out)
    return out, cache


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = _dense(cfg.intermediate_size, "gate_proj", ("embed", "mlp"), cfg)(x)
    up = _dense(cfg.intermediate_size, "up_proj", ("embed", "mlp"), cfg)(x)
    return _dense(cfg.hidden_size, "down_proj", ("mlp", "embed"), cfg)(nn.silu(gate) * up)


def _norm(cfg, name):
  return RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)


class DecoderLayer(nn.Module):
  """Pre-norm LLaMA block. Scanned over layers: carry (x, whole cache), layer index in, x_in out."""
  cfg: LlamaConfig
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, carry, layer, positions, mask, write_index):
    x, cache = carry
    h = _norm(self.cfg, "input_layernorm")(x)
    attn, cache = Attention(self.cfg, name="self_attn")(h, positions, mask, cache, layer, write_index)
    y = x + attn
    y = y + MLP(self.cfg, name="mlp")(_norm(self.cfg, "post_attention_layernorm")(y))
    return (y, cache), (x if self.collect_hidden else None)


class LlamaForCausalLM(nn.Module):
  cfg: LlamaConfig

  def setup(self):
    # In setup (not inline in __call__) so that `embed` can be called on its own: a multimodal model
    # (models/llava.py) embeds the text, places image features, and passes the result as inputs_embeds.
    cfg = self.cfg
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))

  def embed(self, input_ids):
    """Token embeddings [B, T, H] (compute dtype) of int32 input_ids [B, T]: the default inputs_embeds."""
    return self.embed_tokens(input_ids)

  @nn.compact
  def __call__(self, input_ids, positions=None, attention_mask=None, kv_cache: Optional[KVCache] = None,
               write_index=None, hidden_layers: Sequence[int] = (), return_logits: bool = True,
               inputs_embeds=None, logits_at=None):
    """Forward pass.

    Args:
      input_ids: int32 [B, T]; may be None when inputs_embeds is given.
      positions: int32 [B, T] RoPE positions; default: write_index + arange(T) (0.. without cache).
      attention_mask: bool [B, T, S] over key slots (S = cache slots, or T without a cache);
        default causal with slot == position (`masks.causal_mask`). A sliding-window model narrows it to the
        keys within its window by position (`masks.within_window`; the cache's `pos` holds the key positions).
      kv_cache: optional KVCache with k, v of [L, B, KV, S, D]; new keys/values are written at slots
        write_index[b] + arange(T) and the updated cache is returned.
      write_index: int32 [B]; default zeros.
      hidden_layers: static layer indices whose *input* hidden states are returned.
      return_logits: static; False skips the vocabulary projection.
      logits_at: optional int32 [B]: the vocabulary projection at that row of each sequence only (logits
        [B, 1, V]; a prefill reads just the last prompt token's), instead of at every row.
      inputs_embeds: optional [B, T, H] layer-0 inputs used instead of `embed(input_ids)` (e.g. text
        embeddings with image features placed at the image tokens); everything after the embedding is the
        same call, so masks, the KV cache and hidden_layers behave as with input_ids.
    Returns:
      LlamaOutput(logits float32 [B, T, V] ([B, 1, V] with logits_at), kv_cache,
        hidden_states [len(hidden_layers), B, T, H]).
    """
    cfg = self.cfg
    if inputs_embeds is None:
      x = self.embed_tokens(input_ids)
    else:
      x = inputs_embeds.astype(cfg.jnp_dtype)
    b, t = x.shape[:2]
    if write_index is None:
      write_index = jnp.zeros((b,), jnp.int32)
    if positions is None:
      positions = write_index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if attention_mask is None:
      attention_mask = causal_mask(b, t, None if kv_cache is None else kv_cache.num_slots, write_index)
    key_positions = None
    if kv_cache is not None and kv_cache.pos is not None:
      key_positions = write_positions(kv_cache.pos, positions, write_index)
    if cfg.sliding_window is not None:
      if kv_cache is not None and key_positions is None:
        raise ValueError("a sliding-window model's KV cache must hold each slot's position: make it with "
                         "KVCache.zeros(cfg, ...) of this model's config")
      attention_mask = within_window(attention_mask, positions, positions if kv_cache is None else key_positions,
                                     cfg.sliding_window)
    collect = len(hidden_layers) > 0
    cache = None if kv_cache is None else (kv_cache.k, kv_cache.v)
    if cfg.scan_layers:
      ScanLayers = nn.scan(
          DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      (x, cache), layer_inputs = ScanLayers(cfg, collect, name="layers")(
          (x, cache), jnp.arange(cfg.num_layers), positions, attention_mask, write_index)
    else:
      layer_inputs = []
      for i in range(cfg.num_layers):
        (x, cache), x_in = DecoderLayer(cfg, collect, name=f"layers_{i}")(
            (x, cache), i, positions, attention_mask, write_index)
        layer_inputs.append(x_in)
    hidden = None
    if collect:
      hidden = jnp.stack([layer_inputs[i] for i in hidden_layers])
    new_cache = None if kv_cache is None else KVCache(*cache, pos=key_positions)
    logits = None
    if return_logits:
      if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
      h = _norm(cfg, "norm")(x)
      if cfg.tie_word_embeddings:
        logits = self.embed_tokens.attend(h).astype(jnp.float32)
      else:
        logits = _dense(cfg.vocab_size, "lm_head", ("embed", "vocab"), cfg)(h).astype(jnp.float32)
    return LlamaOutput(logits=logits, kv_cache=new_cache, hidden_states=hidden)

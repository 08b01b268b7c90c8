"""EAGLE-3 draft head: fused target features + one LLaMA decoder layer + a reduced-vocabulary lm_head.

The draft reads, per row, a hidden state and the embedding of one token and predicts the token after
that one. Row `t` of a sequence holds:

    hidden: step 0: fc(target features of position t)        (features [.., 3H] = inputs of target
            step k > 0: the draft's own output hidden state     layers cfg.target_layers, concatenated)
    token:  the token at position t + 1 (+ k at step k)
    output: logits over the draft vocabulary for the token after it, and the hidden state to feed back.

The decoder layer's attention input is concat(input_layernorm(embed(token)), hidden_norm(hidden)) (2H
wide); its residual stream starts from `hidden`. Attention is llama.py's `Attention`: explicit RoPE
positions, a boolean mask over key slots and an optional preallocated KV cache (one layer), so
training, cached decoding and tree expansion are the same call with other masks.

The token embedding is the target's embedding matrix, passed in at every call and never a parameter of
this module (frozen: gradients stop at it).

Parameter names follow the EAGLE-3 checkpoints (fc, midlayer.{self_attn,mlp,input_layernorm,hidden_norm,
post_attention_layernorm}, norm, lm_head) so that importing/exporting them is a plain table.

Decoding (slot == position in the draft cache `init_draft_cache(cfg, B, S)`, as in the target's):
  - Context: the target has run over x_0..x_{m-1} (features f_0..f_{m-1}) and produced x_m. One call with
    hidden = f_0..f_{m-1}, input_ids = x_1..x_m, positions 0..m-1, write_index 0, default causal mask
    fills slots 0..m-1; the last row's logits rank the candidates for x_{m+1}, its hidden is their parent's.
    After each verification the same call runs over the newly accepted rows only (write_index = their
    first position; their features come from the target's verification forward), overwriting the tree's
    slots.
  - Tree node at depth d >= 1 (its token is a candidate for x_{m+d}): input_ids = its token,
    hidden = its parent's output hidden [.., H], position m-1+d, written at a free slot >= m; its mask row
    allows slots 0..m-1, the slots of its ancestors and its own slot. Its logits rank its children.
  This is exactly what training unrolls (`vsd_jax.methods.eagle3.loss`): TTT step k at row t is the
  depth-k node of a chain anchored at row t.

Shapes: B batch, T rows, S cache slots, V target vocab, N draft vocab, H hidden, KV kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.llama import MLP, Attention, LlamaConfig, RMSNorm
from vsd_jax.models.masks import causal_mask


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
  """Architecture of an EAGLE-3 draft head. Frozen so it can be a static jit argument."""
  hidden_size: int = 576
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  intermediate_size: int = 1536
  vocab_size: int = 49152          # target vocabulary (embedding rows, d2t/t2d range)
  draft_vocab_size: int = 32000    # rows of lm_head: the N most frequent response tokens
  target_layers: tuple = (2, 15, 27)  # target layers whose *inputs* are fused (2, L//2, L-3)
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling_type: Optional[str] = None
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  max_position_embeddings: int = 8192
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage dtype of parameters

  @classmethod
  def from_target(cls, target: LlamaConfig, draft_vocab_size: Optional[int] = None, **overrides) -> "Eagle3Config":
    """The EAGLE-3 head for `target`: same widths, heads, RoPE and dtypes; draft vocab defaults to V."""
    fields = dict(
        hidden_size=target.hidden_size, num_heads=target.num_heads, num_kv_heads=target.num_kv_heads,
        head_dim=target.head_dim, intermediate_size=target.intermediate_size, vocab_size=target.vocab_size,
        draft_vocab_size=draft_vocab_size or target.vocab_size, target_layers=tuple(target.eagle3_layers),
        rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
        rope_scaling_type=target.rope_scaling_type, rope_scaling_factor=target.rope_scaling_factor,
        rope_low_freq_factor=target.rope_low_freq_factor, rope_high_freq_factor=target.rope_high_freq_factor,
        rope_original_max_position=target.rope_original_max_position,
        max_position_embeddings=target.max_position_embeddings, dtype=target.dtype, param_dtype=target.param_dtype)
    unknown = set(overrides) - set(fields)
    if unknown:
      raise ValueError(f"Eagle3Config.from_target: unknown field(s) {sorted(unknown)}; "
                       f"valid: {sorted(fields)}")
    fields.update(overrides)
    return cls(**fields)

  def replace(self, **kw) -> "Eagle3Config":
    return dataclasses.replace(self, **kw)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def layer_config(self) -> LlamaConfig:
    """The one decoder layer as a 1-layer LlamaConfig: what Attention, MLP and KVCache.zeros read."""
    return LlamaConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
        num_layers=1, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling_type=self.rope_scaling_type,
        rope_scaling_factor=self.rope_scaling_factor, rope_low_freq_factor=self.rope_low_freq_factor,
        rope_high_freq_factor=self.rope_high_freq_factor,
        rope_original_max_position=self.rope_original_max_position,
        max_position_embeddings=self.max_position_embeddings, dtype=self.dtype, param_dtype=self.param_dtype,
        scan_layers=False)


def init_draft_cache(cfg: Eagle3Config, batch: int, num_slots: int, dtype=None) -> KVCache:
  """An empty draft KV cache: k, v of [1, batch, KV, num_slots, D] (one layer), in `dtype` (default compute)."""
  return KVCache.zeros(cfg.layer_config, batch, num_slots, dtype)


class Eagle3Output(NamedTuple):
  logits: jax.Array                # float32 [B, T, N] over the draft vocabulary
  hidden: jax.Array                # [B, T, H] output hidden state (before the final norm): the next step's `hidden`
  kv_cache: Optional[KVCache]      # updated cache, when one was passed


def _norm(cfg: Eagle3Config, name: str) -> RMSNorm:
  return RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)


class Eagle3Layer(nn.Module):
  """The draft's decoder layer: attention over concat(norm(embedding), norm(hidden)), residual on hidden."""
  cfg: Eagle3Config

  @nn.compact
  def __call__(self, emb, hidden, positions, mask, cache=None, write_index=None):
    """emb, hidden: [B,T,H]; positions: int [B,T]; mask: bool [B,T,S]; cache: (k, v) of [1,B,KV,S,D] or None.
    Returns ([B,T,H], updated cache or None)."""
    cfg = self.cfg
    x = jnp.concatenate([_norm(cfg, "input_layernorm")(emb), _norm(cfg, "hidden_norm")(hidden)], axis=-1)
    attn, cache = Attention(cfg.layer_config, name="self_attn")(x, positions, mask, cache, 0, write_index)
    y = hidden + attn
    y = y + MLP(cfg.layer_config, name="mlp")(_norm(cfg, "post_attention_layernorm")(y))
    return y, cache


class Eagle3Draft(nn.Module):
  cfg: Eagle3Config

  @nn.compact
  def __call__(self, embed_matrix, input_ids, hidden, positions=None, attention_mask=None,
               kv_cache: Optional[KVCache] = None, write_index=None) -> Eagle3Output:
    """One draft step over T rows.

    Args:
      embed_matrix: [V, H] the target's token embedding (frozen: wrapped in stop_gradient here).
      input_ids: int32 [B, T]; row t's token (the token after the position its `hidden` describes).
      hidden: [B, T, 3H] target features (fused by `fc`; the first step after the target ran) or
        [B, T, H] the draft's own output hidden state of the parent row (later steps / tree expansion).
        The width picks the case (static).
      positions: int32 [B, T] RoPE positions; default write_index + arange(T) (0.. without a cache).
      attention_mask: bool [B, T, S] over key slots (S = cache slots, or T without a cache);
        default causal with slot == position (`masks.causal_mask`).
      kv_cache: optional draft KVCache, k and v of [1, B, KV, S, D] (`init_draft_cache`); this call's
        keys/values are written at slots write_index[b] + arange(T) before attending.
      write_index: int32 [B], slot of each row's first new key; default zeros.
    Returns:
      Eagle3Output(logits float32 [B, T, N], hidden [B, T, H], kv_cache or None).
    """
    cfg = self.cfg
    b, t = input_ids.shape
    if hidden.shape[-1] == 3 * cfg.hidden_size:
      # fc: [3H, H]; its input is the three fused layers (laid out like an MLP hidden for sharding).
      hidden = nn.Dense(
          cfg.hidden_size, use_bias=False, name="fc", dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("mlp", "embed")))(hidden)
    elif hidden.shape[-1] != cfg.hidden_size:
      raise ValueError(f"Eagle3Draft: hidden has width {hidden.shape[-1]}; expected 3H={3 * cfg.hidden_size} "
                       f"(target features) or H={cfg.hidden_size} (draft hidden state)")
    if embed_matrix.shape != (cfg.vocab_size, cfg.hidden_size):
      raise ValueError(f"Eagle3Draft: embed_matrix has shape {embed_matrix.shape}; expected the target's "
                       f"[{cfg.vocab_size}, {cfg.hidden_size}] embedding")
    if write_index is None:
      write_index = jnp.zeros((b,), jnp.int32)
    if positions is None:
      positions = write_index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if attention_mask is None:
      attention_mask = causal_mask(b, t, None if kv_cache is None else kv_cache.num_slots, write_index)
    emb = jnp.take(jax.lax.stop_gradient(embed_matrix), input_ids, axis=0).astype(cfg.jnp_dtype)
    cache = None if kv_cache is None else (kv_cache.k, kv_cache.v)
    out, cache = Eagle3Layer(cfg, name="midlayer")(
        emb, hidden.astype(cfg.jnp_dtype), positions, attention_mask, cache, write_index)
    logits = nn.Dense(
        cfg.draft_vocab_size, use_bias=False, name="lm_head", dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")))(
            _norm(cfg, "norm")(out))
    return Eagle3Output(logits.astype(jnp.float32), out, None if kv_cache is None else KVCache(*cache))

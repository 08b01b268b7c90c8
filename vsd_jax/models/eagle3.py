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

Vision adaptor (cfg.vision_adaptor, multimodal targets; ViSpec's idea, `VisionAdaptor`): the call over a whole
sequence or prompt (target features, `image_mask` = its image-token positions, `image_positions`) compresses the
rows at image positions into one image vector per batch row and returns it (Eagle3Output.image_vector); every
later call of that sequence (TTT steps, tree nodes, accepted tokens) gets it back as `image_vector`. In every call
it is added, through a [H, H] projection initialised to zero, to the token embedding of each text row (a row whose
token is not the image token), before input_layernorm. A fresh adaptor therefore leaves the draft exactly the
plain EAGLE-3 draft, and a row without images gets a zero vector. What it reads: the draft's own step-0 hidden
state at the image positions, fc(target features) - the features the plain draft already reads there, so it works
with precomputed features too and needs no image input of its own. The vector is one per sequence, pooled over all
its image positions (in the prompt), and fused into every row of it, in training and decoding alike.

Shapes: B batch, T rows, S cache slots, V target vocab, N draft vocab, H hidden, KV kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.llama import MLP, ArchConfig, Attention, LlamaConfig, RMSNorm, dot_product_attention
from vsd_jax.models.masks import causal_mask


@dataclasses.dataclass(frozen=True)
class Eagle3Config(ArchConfig):
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
  image_token_id: int = -1      # a multimodal (LLaVA) target's image token; -1: a text target
  vision_adaptor: bool = False  # the ViSpec-style vision adaptor (`VisionAdaptor`; needs image_token_id >= 0)
  vision_queries: int = 4       # its learned queries

  def __post_init__(self):
    if self.vision_adaptor and self.image_token_id < 0:
      raise ValueError("Eagle3Config: vision_adaptor=True needs a multimodal target (image_token_id >= 0, from a "
                       "LLaVA target's config); a text target has no image positions to read. Use "
                       "vision_adaptor=False (config: --config.draft.vision_adaptor=False) for text targets.")
    if self.vision_adaptor and self.vision_queries < 1:
      raise ValueError(f"Eagle3Config: vision_queries={self.vision_queries}; the vision adaptor needs at least one "
                       "learned query (config: --config.draft.vision_queries=4)")

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
        max_position_embeddings=target.max_position_embeddings, dtype=target.dtype, param_dtype=target.param_dtype,
        image_token_id=int(getattr(target, "image_token_id", -1)),  # LlavaConfig's own field; LlamaConfig has none
        vision_adaptor=cls.vision_adaptor, vision_queries=cls.vision_queries)
    unknown = set(overrides) - set(fields)
    if unknown:
      raise ValueError(f"Eagle3Config.from_target: unknown field(s) {sorted(unknown)}; "
                       f"valid: {sorted(fields)}")
    fields.update(overrides)
    return cls(**fields)

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
  image_vector: Optional[jax.Array] = None  # [B, H] with the vision adaptor: this sequence's image vector


def _norm(cfg: Eagle3Config, name: str) -> RMSNorm:
  return RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)


def image_positions(cfg: Eagle3Config, input_ids: jax.Array, valid: Optional[jax.Array] = None):
  """bool [B, T] the valid image-token positions of input_ids [B, T] (unshifted: position t holds token t, as the
  target features of row t) that a draft with the vision adaptor pools; None for a draft without it."""
  if not cfg.vision_adaptor:
    return None
  is_image = input_ids == cfg.image_token_id
  return is_image if valid is None else is_image & valid.astype(bool)


class VisionAdaptor(nn.Module):
  """The draft's vision adaptor: a few learned queries compress the image positions into one vector per row, which
  a zero-initialised projection adds to the token embedding of every text row.

  Pooling (when image_mask is given): cfg.vision_queries learned queries (Q heads of head_dim, no RoPE: they have
  no position) attend over the rows of `image_rows` at image_mask (keys / values from their RMSNorm through k_proj
  / v_proj, KV heads), with the project's one attention kernel (`llama.dot_product_attention`); o_proj maps each
  query's output to [H] and their mean is the image vector. A batch row without an image position gets 0.
  Fusion: emb + fuse(image_vector) at the text rows; fuse [H, H] starts at zero (the plain draft at init).
  """
  cfg: Eagle3Config

  @nn.compact
  def __call__(self, emb, text_rows, image_vector=None, image_rows=None, image_mask=None):
    """emb: [B, T, H] token embeddings; text_rows: bool [B, T] rows whose token is not the image token.
    image_rows: [B, S, H] with image_mask: bool [B, S] (pool them), or image_vector: [B, H] (an earlier call's),
    or neither (no image: zero vector). Returns (emb with the vector fused at text rows [B, T, H], vector [B, H])."""
    cfg = self.cfg
    b, _, h = emb.shape
    d, heads, kv_heads, nq = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.vision_queries

    def dense(n, name, axes, init=nn.initializers.normal(0.02)):
      return nn.Dense(n, use_bias=False, name=name, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                      kernel_init=nn.with_logical_partitioning(init, axes))

    if image_mask is not None:
      s = image_rows.shape[1]
      queries = self.param("queries", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "heads")),
                           (nq, heads * d), cfg.jnp_param_dtype)
      x = _norm(cfg, "kv_norm")(image_rows.astype(cfg.jnp_dtype))
      k = dense(kv_heads * d, "k_proj", ("embed", "kv_heads"))(x).reshape(b, s, kv_heads, d).transpose(0, 2, 1, 3)
      v = dense(kv_heads * d, "v_proj", ("embed", "kv_heads"))(x).reshape(b, s, kv_heads, d).transpose(0, 2, 1, 3)
      q = jnp.broadcast_to(queries.astype(cfg.jnp_dtype).reshape(1, nq, heads, d), (b, nq, heads, d))
      mask = jnp.broadcast_to(image_mask.astype(bool)[:, None, :], (b, nq, s))
      out = dot_product_attention(q, k, v, mask).reshape(b, nq, heads * d)
      pooled = jnp.mean(dense(h, "o_proj", ("heads", "embed"))(out).astype(jnp.float32), axis=1)
      image_vector = jnp.where(jnp.any(image_mask, axis=1)[:, None], pooled, 0.0).astype(cfg.jnp_dtype)
    elif image_vector is None:
      image_vector = jnp.zeros((b, h), cfg.jnp_dtype)
    delta = dense(h, "fuse", (None, "embed"), nn.initializers.zeros)(image_vector.astype(cfg.jnp_dtype))
    return emb + jnp.where(text_rows[..., None], delta[:, None, :], 0).astype(emb.dtype), image_vector


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
               kv_cache: Optional[KVCache] = None, write_index=None, image_mask=None,
               image_vector=None) -> Eagle3Output:
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
      image_mask: bool [B, T] (vision adaptor only, with target features): rows at image-token positions
        (`image_positions`); pooled into this sequence's image vector, fused into this call's text rows.
      image_vector: [B, H] (vision adaptor only): the vector an earlier call of this sequence returned, fused
        into this call's text rows. With the adaptor and neither: no image (nothing changes).
    Returns:
      Eagle3Output(logits float32 [B, T, N], hidden [B, T, H], kv_cache or None, image_vector [B, H] with the
      vision adaptor, else None).
    """
    cfg = self.cfg
    b, t = input_ids.shape
    if (image_mask is not None or image_vector is not None) and not cfg.vision_adaptor:
      raise ValueError("Eagle3Draft: image_mask / image_vector given but this draft has no vision adaptor "
                       "(Eagle3Config.vision_adaptor=False); pass them only to a draft built with it")
    if image_mask is not None and (image_vector is not None or hidden.shape[-1] != 3 * cfg.hidden_size):
      raise ValueError("Eagle3Draft: image_mask pools this call's target features (hidden [B, T, 3H]) into a new "
                       "image vector; pass it with target features and without image_vector")
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
    hidden = hidden.astype(cfg.jnp_dtype)
    if cfg.vision_adaptor:
      if image_mask is None and image_vector is None and self.is_initializing():  # create the pooling params too
        image_mask = jnp.zeros((b, t), bool)
      emb, image_vector = VisionAdaptor(cfg, name="vision_adaptor")(
          emb, input_ids != cfg.image_token_id, image_vector, hidden if image_mask is not None else None, image_mask)
    cache = None if kv_cache is None else (kv_cache.k, kv_cache.v)
    out, cache = Eagle3Layer(cfg, name="midlayer")(
        emb, hidden, positions, attention_mask, cache, write_index)
    logits = nn.Dense(
        cfg.draft_vocab_size, use_bias=False, name="lm_head", dtype=cfg.jnp_dtype,
        param_dtype=cfg.jnp_param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")))(
            _norm(cfg, "norm")(out))
    return Eagle3Output(logits.astype(jnp.float32), out, None if kv_cache is None else KVCache(*cache),
                        image_vector if cfg.vision_adaptor else None)

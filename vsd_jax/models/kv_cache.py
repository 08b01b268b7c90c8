"""Preallocated KV cache as a pytree, and the row-wise slot writes the attention path uses."""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  # Heads before slots: decode attention is then a plain batched matmul (3x faster on CPU than [.., S, KV, D]).
  k: jax.Array  # [L, B, KV, S, D]
  v: jax.Array  # [L, B, KV, S, D]
  # int32 [B, S]: the RoPE position of the token in each slot, kept only for a sliding-window model (its window is
  # by position, and a tree's nodes sit at slots != positions); None (no leaves) otherwise.
  pos: Optional[jax.Array] = None

  @property
  def num_slots(self) -> int:
    return self.k.shape[3]

  @classmethod
  def zeros(cls, cfg, batch: int, num_slots: int, dtype=None) -> "KVCache":
    """An empty cache for `cfg` (a LlamaConfig): [L, batch, KV, num_slots, D] in `dtype` (default compute), and
    slot positions int32 [batch, num_slots] when cfg has a sliding window."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, num_slots, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    pos = jnp.zeros((batch, num_slots), jnp.int32) if getattr(cfg, "sliding_window", None) is not None else None
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pos)


def write_layer(cache: jax.Array, layer, new: jax.Array, write_index: jax.Array) -> jax.Array:
  """Write new [B, T, KV, D] into cache [L, B, KV, S, D] at layer `layer`, slots write_index[b] + arange(T).

  A scatter into the whole (loop-carried, donated) cache: XLA updates it in place, where stacking
  per-layer slices as scan outputs would copy the cache every step.
  """
  b, t = new.shape[:2]
  rows = jnp.arange(b)[:, None]
  slots = write_index.astype(jnp.int32)[:, None] + jnp.arange(t)[None, :]
  # Advanced indices split by a slice: the update is indexed [B, T, KV, D], as `new` is.
  return cache.at[layer, rows, :, slots].set(new.astype(cache.dtype), unique_indices=True, mode="drop")


def write_positions(pos: jax.Array, positions: jax.Array, write_index: jax.Array) -> jax.Array:
  """pos int32 [B, S] with positions [B, T] written at slots write_index[b] + arange(T) (as `write_layer`)."""
  b, t = positions.shape
  slots = write_index.astype(jnp.int32)[:, None] + jnp.arange(t)[None, :]
  return pos.at[jnp.arange(b)[:, None], slots].set(positions.astype(pos.dtype), mode="drop")


def gather_slots(cache: KVCache, src_slots: jax.Array, dst_start: jax.Array) -> KVCache:
  """Copy slots src_slots[b, j] to dst_start[b] + j in every layer (compacts an accepted tree path).

  src_slots: int32 [B, P]; dst_start: int32 [B]. Slots past the path are left as they were (masked).
  """
  b, p = src_slots.shape
  rows = jnp.arange(b)[:, None]
  dst = dst_start.astype(jnp.int32)[:, None] + jnp.arange(p)[None, :]

  def move(a):  # a: [L, B, KV, S, D]; picked: [B, P, L, KV, D] (advanced indices first)
    picked = a[:, rows, :, src_slots]
    return a.at[:, rows, :, dst].set(picked, mode="drop")
  pos = None
  if cache.pos is not None:
    pos = cache.pos.at[rows, dst].set(cache.pos[rows, src_slots], mode="drop")
  return KVCache(move(cache.k), move(cache.v), pos)

"""Preallocated KV cache as a pytree, and the row-wise slot writes the attention path uses."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  k: jax.Array  # [L, B, S, K, D]
  v: jax.Array  # [L, B, S, K, D]

  @property
  def num_slots(self) -> int:
    return self.k.shape[2]

  @classmethod
  def zeros(cls, cfg, batch: int, num_slots: int, dtype=None) -> "KVCache":
    """An empty cache for `cfg` (a LlamaConfig): [L, batch, num_slots, K, D] in `dtype` (default compute)."""
    shape = (cfg.num_layers, batch, num_slots, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_rows(cache: jax.Array, new: jax.Array, write_index: jax.Array) -> jax.Array:
  """Write new [B, T, ...] into cache [B, S, ...] at slots write_index[b] + arange(T) per row."""
  def one(c, n, i):
    start = (i,) + (0,) * (c.ndim - 1)
    return jax.lax.dynamic_update_slice(c, n, start)
  return jax.vmap(one)(cache, new, write_index.astype(jnp.int32))


def gather_slots(cache: KVCache, src_slots: jax.Array, dst_start: jax.Array) -> KVCache:
  """Copy slots src_slots[b, j] to dst_start[b] + j in every layer (compacts an accepted tree path).

  src_slots: int32 [B, P]; dst_start: int32 [B]. Slots past the path are left as they were (masked).
  """
  def per_array(a):  # a: [L, B, S, K, D]
    picked = jax.vmap(lambda ab, s: ab[:, s], in_axes=(1, 0), out_axes=1)(a, src_slots)  # [L,B,P,K,D]
    return jax.vmap(lambda ab, pb, i: jax.lax.dynamic_update_slice(ab, pb, (0, i, 0, 0)),
                    in_axes=(1, 1, 0), out_axes=1)(a, picked, dst_start)
  return KVCache(per_array(cache.k), per_array(cache.v))

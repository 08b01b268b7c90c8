"""The VSD oracle: the target's distributions p_k = p(. | s[<=t], z_<k) along every draft path.

p_1 is the target's own next-token distribution at the anchor (from the training pass over the sequence).
p_2..p_K come from ONE target forward over the tokens z_1..z_{K-1} of all M*S paths of a sequence, with
tree attention over the sequence's keys/values: the call is `vsd_jax.decoding.tree.tree_forward`, the same
one decoding verification uses. Node z_k of an anchor-t path sits at position t + k, sees the sequence
slots <= t and its own path's earlier nodes, and is written at window slots T.. past the sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsd_jax.decoding.tree import tree_forward
from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.masks import path_ancestors


def oracle_slots(seq_len: int, num_anchors: int, num_paths: int, depth: int) -> int:
  """KV-cache slots the oracle needs: the sequence plus every path's first K-1 tokens."""
  return seq_len + num_anchors * num_paths * max(depth - 1, 1)


def oracle_logits(target_model, target_params, kv_cache: KVCache, seq_len: int, prefix_logits: jax.Array,
                  anchors: jax.Array, path_tokens: jax.Array) -> jax.Array:
  """Target logits of p_1..p_K along each path. Pure and jittable (target_model, seq_len static).

  Args:
    kv_cache: the target's cache holding the sequences at slots 0..seq_len-1 (`target_pass` with
      cache_slots >= oracle_slots(...)).
    prefix_logits: float32 [B, T, V] the target's logits over the sequences (row t = p(. | s[<=t])).
    anchors: int32 [B, M]; path_tokens: int32 [B, M, S, K] target-vocabulary ids.
  Returns:
    float32 [B, M, S, K, V], under stop_gradient.
  """
  b, m, s, k = path_tokens.shape
  p1 = jax.vmap(lambda lg, a: lg[a])(prefix_logits, anchors)                 # [B, M, V]
  p1 = jnp.broadcast_to(p1[:, :, None, None], (b, m, s, 1, p1.shape[-1]))
  if k == 1:
    return jax.lax.stop_gradient(p1)
  n = k - 1
  nodes = path_tokens[..., :n].reshape(b, m * s * n)
  depths = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, m * s, n)).reshape(b, -1)
  committed = jnp.repeat(anchors + 1, s * n, axis=1)                         # node sees slots <= t
  ancestors = jnp.broadcast_to(path_ancestors(m * s, n)[None], (b, m * s * n, m * s * n))
  out = tree_forward(target_model, target_params, kv_cache, nodes, depths, ancestors, committed,
                     window_start=jnp.full((b,), seq_len, jnp.int32))
  later = out.logits.reshape(b, m, s, n, -1)
  return jax.lax.stop_gradient(jnp.concatenate([p1, later], axis=3))

"""Attention masks and RoPE positions: the one home of every mask the one attention path is called with.

Every model call (`llama.LlamaForCausalLM`, `eagle3.Eagle3Draft`) takes explicit positions and a boolean mask
bool [B, T, S] over S key slots (the KV cache's slots, or the T new tokens without a cache). The uses differ
only in the mask:

    causal_mask          prefill / training forward, slot == position            (model default)
    full_mask            bidirectional: every query sees every key (the CLIP vision tower, models/clip.py)
    decode_mask          one new token per row at its own slot (vanilla decoding)
    sequence_mask        a padded sequence at slots 0..T-1 of a larger cache, causal over valid tokens
    tree_attention_mask  committed prefix (< L, per row or per query) + a window of scratch/tree slots
    chain_attention_mask R chains unrolled together (TTT, VSD paths, chain decoding): prefix + own steps
    chain_window_mask    its window part
    ancestor_mask        the window part for a draft tree, from parent pointers (decoding verification)
    path_ancestors       the window part for many flat paths verified in one tree forward (VSD oracle)
    within_window        any of them narrowed to a sliding window by position (Mistral; applied by the model)

Shapes: B batch, T queries, S key slots, W window slots, R chain rows per batch row.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def positions_from_mask(valid: jax.Array) -> jax.Array:
  """RoPE positions int32 [B, T] of a (left- or right-) padded batch: index among the valid tokens."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def causal_mask(batch: int, num_queries: int, num_slots: Optional[int] = None,
                write_index: Optional[jax.Array] = None) -> jax.Array:
  """bool [B, T, S]: query i of row b sees slots <= write_index[b] + i (slot == position).

  Without num_slots (no cache) S = T and write_index is 0. write_index: int32 [B].
  """
  t = num_queries
  if num_slots is None:
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
  q_slot = write_index[:, None] + jnp.arange(t)[None, :]  # [B, T]
  return jnp.arange(num_slots)[None, None, :] <= q_slot[:, :, None]


def full_mask(batch: int, num_queries: int, num_slots: Optional[int] = None) -> jax.Array:
  """bool [B, T, S] all True: bidirectional attention over S key slots (default S = T), as in a ViT encoder."""
  return jnp.ones((batch, num_queries, num_queries if num_slots is None else num_slots), bool)


def decode_mask(positions: jax.Array, num_slots: int) -> jax.Array:
  """bool [B, 1, S]: one new token per row at slot == position positions[b] (int32 [B]) sees slots <= it."""
  return causal_mask(positions.shape[0], 1, num_slots, positions)


def sequence_mask(valid: jax.Array, num_slots: int) -> jax.Array:
  """bool [B, T, S]: a sequence at slots 0..T-1 of S >= T slots, causal over its valid tokens. valid: [B, T]."""
  t = valid.shape[1]
  key_valid = jnp.pad(valid.astype(bool), ((0, 0), (0, num_slots - t)))          # [B, S]
  return (jnp.arange(num_slots)[None, :] <= jnp.arange(t)[:, None])[None] & key_valid[:, None, :]


def tree_attention_mask(committed_len: jax.Array, local_mask: jax.Array, num_slots: int,
                        window_start: Optional[jax.Array] = None) -> jax.Array:
  """bool [B, T, S]: query i sees the committed slots < L and the window slots W0 + j where local_mask[i, j].

  committed_len: int32 [B], or [B, T] per query (several chains or trees over one sequence's prefixes:
  each query sees its own prefix). local_mask: bool [B, T, W] over the window slots W0 .. W0+W-1 (a tree's
  ancestor mask, the draft's scratch mask during expansion, `chain_window_mask`, `path_ancestors`).
  window_start: int32 [B] slot W0 of the window; default committed_len (which must then be [B]).
  """
  t, w = local_mask.shape[1], local_mask.shape[2]
  if window_start is None:
    window_start = committed_len
  if committed_len.ndim == 1:
    committed_len = jnp.broadcast_to(committed_len[:, None], (committed_len.shape[0], t))
  slots = jnp.arange(num_slots)
  rel = slots[None, :] - window_start[:, None]                             # [B, S]
  in_window = (rel >= 0) & (rel < w)
  seen = jnp.take_along_axis(local_mask, jnp.clip(rel, 0, w - 1)[:, None, :].repeat(t, axis=1), axis=2)
  committed = slots[None, None, :] < committed_len[:, :, None]             # [B, T, S]
  return committed | (in_window[:, None, :] & seen)


def chain_window_mask(num_rows: int, window: int, step) -> jax.Array:
  """bool [R, W]: R chains unrolled together, chain step i (1-based) of row r at window slot (i-1)*R + r.

  At step `step` (int or traced int32; the token fed is z_step) row r sees its own steps 1..step: slots
  (i-1)*R + r for i <= step. W >= (depth-1)*R.
  """
  rows = jnp.arange(num_rows)[:, None]
  cols = jnp.arange(window)[None, :]
  return (cols % num_rows == rows) & (cols // num_rows < step)


def chain_attention_mask(committed: jax.Array, num_rows: int, depth: int, step, num_slots: int,
                         window_start: jax.Array, key_valid: Optional[jax.Array] = None) -> jax.Array:
  """bool [B, R, S]: chain step `step` of R chains per batch row (`draft_unroll.unroll_chain`).

  Chain r sees the prefix slots < committed (int32 [B] or [B, R]; only those with key_valid, bool [B, S0],
  when given) and its own steps 1..step in the window of (depth-1)*R slots at window_start (int32 [B]).
  """
  b = window_start.shape[0]
  window = max(depth - 1, 1) * num_rows
  local = jnp.broadcast_to(chain_window_mask(num_rows, window, step)[None], (b, num_rows, window))
  mask = tree_attention_mask(committed, local, num_slots, window_start=window_start)
  if key_valid is not None:
    pad = num_slots - key_valid.shape[1]
    mask = mask & jnp.pad(key_valid.astype(bool), ((0, 0), (0, pad)), constant_values=True)[:, None, :]
  return mask


def ancestor_mask(parents: jax.Array, depth: int) -> jax.Array:
  """bool [T, T] with [i, j] = j is i or an ancestor of i, from parent pointers (root's parent = 0)."""
  t = parents.shape[0]
  cur = jnp.arange(t)
  mask = jnp.zeros((t, t), bool)
  for _ in range(depth + 1):
    mask = mask | jax.nn.one_hot(cur, t, dtype=bool)
    cur = parents[cur]
  return mask


def path_ancestors(num_paths: int, length: int) -> jax.Array:
  """bool [P*n, P*n]: P flat paths of n nodes each laid out path by path; node (p, i) sees (p, j <= i)."""
  path_id = jnp.arange(num_paths * length) // length
  step = jnp.arange(num_paths * length) % length
  return (path_id[:, None] == path_id[None, :]) & (step[None, :] <= step[:, None])


def within_window(mask: jax.Array, query_positions: jax.Array, key_positions: jax.Array, window: int) -> jax.Array:
  """bool [B, T, S]: `mask` where the key is within a sliding window of the query, by RoPE position.

  query_positions: int32 [B, T]; key_positions: int32 [B, S] (the KV cache's `pos`, or the queries' own positions
  without a cache). A query at position p keeps keys at positions > p - window (transformers' sliding-window
  overlay), so prefill, cached decoding and tree verification see the same keys whatever slots they occupy.
  """
  return mask & (key_positions[:, None, :] > query_positions[:, :, None] - window)

"""The draft's decode-time chain unroll: one `jax.lax.scan` for EAGLE-3's TTT, VSD's draft paths and chain
speculative decoding.

All three run the same recursion. R chains per batch row start from the draft's output at the last
position of each chain's committed prefix (logits of q_1, hidden h_0, RoPE position p). Step i = 1..K-1
feeds z_i (a target id) with h_{i-1} at position p + i, writes its key/value at window slot
W0 + (i-1)*R + r, attends to the prefix slots < committed and to its own chain's earlier window slots
(`masks.chain_window_mask`), and gives q_{i+1} and h_i. They differ only in how z_i is chosen:

    TTT (training)        z_i = the true token (teacher forcing); R = T chains, one per sequence row
    VSD paths (training)  z_i ~ q_i (E-step proposals), or given paths to re-score; R = anchors x paths
    chain decoding        z_i ~ warped q_i (temperature, top-p) or argmax; R = 1 per batch row

Dynamic tree expansion (`vsd_jax.decoding.tree.expand_tree`) is not this recursion: each level re-selects
its frontier (top-k of all children by cumulative score), so a row's parent changes from level to level
and its attention window is the tree's ancestor set, not a fixed chain. It keeps its own loop.

Shapes: B batch, T sequence, R chains per batch row, K depth (steps), N draft vocab, H hidden, S cache slots.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from vsd_jax.models.eagle3 import Eagle3Draft, Eagle3Output, image_positions, init_draft_cache
from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.masks import chain_attention_mask, positions_from_mask, sequence_mask


def shift_left(x: jax.Array, n: int) -> jax.Array:
  """x[:, n:] padded at the end with zeros (False) back to length T. x: [B, T, ...]; n: a Python int (inside a
  scan over n, use `left_shifter`).

  The draft's row alignment: row t of a sequence holds the token at t + 1, so its inputs are shifted ids."""
  return jnp.pad(x[:, n:], [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))


def left_shifter(x: jax.Array) -> Callable:
  """n (traced int32) -> shift_left(x, n), padding x once (for use inside a scan over n). x: [B, T, ...]."""
  t = x.shape[1]
  padded = jnp.pad(x, [(0, 0), (0, t)] + [(0, 0)] * (x.ndim - 2))
  return lambda n: jax.lax.dynamic_slice_in_dim(padded, n, t, axis=1)


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x [B, T, ...], rows int32 [B, M] -> [B, M, ...]."""
  return jax.vmap(lambda a, r: a[r])(x, rows)


def chain_slots(seq_len: int, num_rows: int, depth: int) -> int:
  """Draft cache slots for a sequence of seq_len plus the window of R chains of K steps."""
  return seq_len + max(depth - 1, 1) * num_rows


def draft_fn_of(draft_module: Eagle3Draft, draft_params, embed_matrix: jax.Array,
                image_vector: Optional[jax.Array] = None) -> Callable:
  """The draft's cached call in the form `unroll_chain` and tree expansion use:
  (cache, tokens [B,k], hidden [B,k,H], positions [B,k], mask [B,k,S], write_index [B]) -> (logits, hidden, cache).
  image_vector: [B, H] the sequences' image vector (a draft with the vision adaptor: the `image_vector` of their
  `sequence_step` / decoding prefill), fused into every call; None without the adaptor."""
  def draft_fn(cache, tokens, hidden, positions, mask, write_index):
    out = draft_module.apply({"params": draft_params}, embed_matrix, tokens, hidden, positions=positions,
                             attention_mask=mask, kv_cache=cache, write_index=write_index, image_vector=image_vector)
    return out.logits, out.hidden, out.kv_cache
  return draft_fn


def with_slots(step0: Eagle3Output, num_slots: int) -> Eagle3Output:
  """A `sequence_step` output whose cache is padded (with empty slots) to num_slots >= its own."""
  pad = lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, num_slots - a.shape[3]), (0, 0)])    # [1, B, KV, S, D]
  return step0._replace(kv_cache=KVCache(pad(step0.kv_cache.k), pad(step0.kv_cache.v)))


def sequence_step(draft_module: Eagle3Draft, draft_params, embed_matrix: jax.Array, features: jax.Array,
                  input_ids: jax.Array, valid: jax.Array, num_slots: int = 0) -> Eagle3Output:
  """The draft's first step over whole sequences: row t reads the target features of t and token t+1.

  features: [B, T, 3H]; input_ids: int32 [B, T]; valid: bool [B, T]; num_slots (static, 0 = T) >= T: the
  sequence is written at slots 0..T-1 of a fresh draft cache (causal over valid tokens, RoPE positions among
  them). The step attends over its T slots only; the cache is then padded to num_slots (`with_slots`) for the
  chains' window. One step-0 output serves several unrolls (VSD's paths and its EAGLE-3 term).
  A draft with the vision adaptor pools the sequence's image-token positions (`eagle3.image_positions`) here.
  Returns Eagle3Output(logits float32 [B, T, N] (q_1 of a chain anchored at row t), hidden [B, T, H], cache,
  image_vector [B, H] or None: pass it to the unroll's `draft_fn_of`).
  """
  b, t = input_ids.shape
  out = draft_module.apply({"params": draft_params}, embed_matrix, shift_left(input_ids, 1), features,
                           positions_from_mask(valid), sequence_mask(valid, t),
                           init_draft_cache(draft_module.cfg, b, t), jnp.zeros((b,), jnp.int32),
                           image_mask=image_positions(draft_module.cfg, input_ids, valid))
  return with_slots(out, num_slots or t)


class Chain(NamedTuple):
  records: object   # choose's records stacked over steps: leaves [K, B, R, ...]
  reduced: object   # reduce's outputs stacked over steps: leaves [K, ...]
  cache: object     # the draft cache after the unroll (window slots written)


def unroll_chain(draft_fn: Callable, cache, first_logits: jax.Array, first_hidden: jax.Array,
                 positions: jax.Array, committed: jax.Array, window_start: jax.Array, *, depth: int,
                 choose: Callable, rng: Optional[jax.Array] = None, reduce: Optional[Callable] = None,
                 key_valid: Optional[jax.Array] = None, remat: bool = True) -> Chain:
  """Unroll R draft chains of `depth` steps per batch row (see the module docstring). Pure and jittable.

  Args:
    draft_fn: the draft's cached call (`draft_fn_of`).
    cache: draft KVCache with >= window_start + (depth-1)*R slots; slots < committed hold each chain's prefix.
    first_logits: float32 [B, R, N] q_1; first_hidden: [B, R, H] h_0 (the draft's outputs that gave them).
    positions: int32 [B, R] the RoPE position of those outputs (z_i is fed at positions + i).
    committed: int32 [B] or [B, R]: chain r sees the cache slots < committed (its prefix).
    window_start: int32 [B] slot W0 of the chains' window.
    depth: static K >= 1. choose(i, logits [B, R, N], key) -> (z_{i+1} as target ids int32 [B, R], record
      pytree), for i = 0..K-1 (i is a traced int32 inside the scan). rng: PRNG key, fold_in(rng, i) at step i.
    reduce: (i, logits [B, R, N]) -> pytree kept per step (default: the logits themselves).
    key_valid: optional bool [B, S0] (S0 <= S): prefix slots that may be attended (padding excluded).
    remat: under differentiation, keep only the weight matmuls' outputs of each step and recompute the rest
      (attention scores over all S slots) in the backward pass: the scan's window makes every step attend
      over S = T + (K-1)R slots, and saving those scores for K steps dominates training memory (without
      remat the Llama-3.1-8B dry run needs 84 GiB of activations per chip, with it 31). No effect without
      a gradient.
  Returns:
    Chain(records [K, ...], reduced [K, ...], cache).
  """
  r = first_logits.shape[1]
  num_slots = cache.num_slots
  rng = jax.random.PRNGKey(0) if rng is None else rng
  reduce = reduce or (lambda i, logits: logits)
  zero = jnp.int32(0)
  feed, record = choose(zero, first_logits, jax.random.fold_in(rng, 0))
  red = reduce(zero, first_logits)

  def step(carry, i):
    """Feed z_i with h_{i-1}; return q_{i+1}'s choice and reduction."""
    cache, prev, hidden = carry
    mask = chain_attention_mask(committed, r, depth, i, num_slots, window_start, key_valid)
    logits, hidden, cache = draft_fn(cache, prev, hidden, positions + i, mask, window_start + (i - 1) * r)
    nxt, rec = choose(i, logits, jax.random.fold_in(rng, i))
    return (cache, nxt, hidden), (rec, reduce(i, logits))

  stack = lambda first, rest: jax.tree_util.tree_map(lambda a, b_: jnp.concatenate([a[None], b_], axis=0),
                                                     first, rest)
  if depth == 1:
    expand = lambda x: jax.tree_util.tree_map(lambda a: a[None], x)
    return Chain(expand(record), expand(red), cache)
  if remat:
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable, prevent_cse=False)
  (cache, _, _), (records, reduced) = jax.lax.scan(step, (cache, feed, first_hidden),
                                                   jnp.arange(1, depth, dtype=jnp.int32))
  return Chain(stack(record, records), stack(red, reduced), cache)

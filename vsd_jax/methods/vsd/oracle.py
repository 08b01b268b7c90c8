"""The VSD oracle: what VSD reads from the target's p_k = p(. | s[<=t], z_<k) along every draft path.

p_1 is the target's own next-token distribution at the anchor (from the training pass over the sequence).
p_2..p_K come from ONE target forward over the tokens z_1..z_{K-1} of all M*S paths of a sequence, with
tree attention over the sequence's keys/values: the call is `vsd_jax.decoding.tree.tree_forward`, the same
one decoding verification uses. Node z_k of an anchor-t path sits at RoPE position pos(t) + k, pos the
index among the sequence's valid tokens (`positions_from_mask`, as the draft's paths and the training pass
use), sees the valid sequence slots <= t and its own path's earlier nodes, and is written at window slots
T.. past the sequence. Left and right padding give the same p_k.

Nothing downstream needs the full-vocabulary logits [B, M, S, K, V] (6 GB in float32 at M=16, S=8, K=6 for a
128k vocabulary and 16 sequences): the forward's logits are reduced right after it to `OracleOutputs`, the
four things acceptance (`utility.acceptance`) and CAR (`mstep.car_loss`) read, each per path token, plus the
logits at the draft vocabulary's N ids when CAR is on.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from vsd_jax.decoding.tree import tree_forward
from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.masks import path_ancestors, positions_from_mask


class OracleOutputs(NamedTuple):
  """The target's p_k along each path, reduced to what VSD reads; under stop_gradient. [..., K] is
  [B, M, S, K] from `oracle_outputs`; N the draft vocabulary; T the acceptance temperature."""
  token_prob: jax.Array              # float32 [..., K] p_k^T(z_k) = softmax(logits / T)[z_k]: stochastic acceptance
  argmax: jax.Array                  # int32 [..., K] argmax_v p_k(v) (target id): greedy acceptance
  top_logp: jax.Array                # float32 [..., K] max_v log p_k(v) at temperature 1: CAR's confidence
  draft_logits: Optional[jax.Array]  # float32 [..., K, N] logits at the draft vocabulary's ids (CAR), or None


def oracle_slots(seq_len: int, num_anchors: int, num_paths: int, depth: int) -> int:
  """KV-cache slots the oracle needs: the sequence plus every path's first K-1 tokens."""
  return seq_len + num_anchors * num_paths * max(depth - 1, 1)


def _reduce(logits: jax.Array, tokens: jax.Array, temperature: float, draft_ids: Optional[jax.Array]):
  """logits [..., V]; tokens int32 [..., J]: J ids read from each distribution. Returns (token_prob [..., J],
  argmax [...], top_logp [...], draft_logits [..., N] or None). jax.nn.log_softmax's arithmetic (shift by the
  max, then log-sum-exp), as reductions: no [..., V] array besides the logits."""
  if temperature <= 0:
    raise ValueError(f"the oracle's token probability needs a temperature > 0 (got {temperature}); greedy "
                     "acceptance reads the argmax (pass 1.0)")
  x = jax.lax.stop_gradient(logits.astype(jnp.float32))
  x_max = jnp.max(x, axis=-1, keepdims=True)
  x_lse = jnp.log(jnp.sum(jnp.exp(x - x_max), axis=-1, keepdims=True))
  top_logp = -x_lse[..., 0]                                  # = max_v log_softmax(x)_v: the max shifts to 0
  if temperature == 1.0:
    z, z_max, z_lse = x, x_max, x_lse
  else:
    z = x / temperature
    z_max = jnp.max(z, axis=-1, keepdims=True)
    z_lse = jnp.log(jnp.sum(jnp.exp(z - z_max), axis=-1, keepdims=True))
  token_prob = jnp.exp(jnp.take_along_axis(z, tokens, axis=-1) - z_max - z_lse)
  argmax = jnp.argmax(x, axis=-1).astype(jnp.int32)
  draft_logits = None if draft_ids is None else jnp.take(x, draft_ids, axis=-1)
  return token_prob, argmax, top_logp, draft_logits


def reduce_logits(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0,
                  draft_ids: Optional[jax.Array] = None) -> OracleOutputs:
  """Full logits of p_k [..., K, V] and the path tokens z_k [..., K] -> OracleOutputs [..., K].

  temperature: > 0, the acceptance temperature T of token_prob. draft_ids: int32 [N] the draft vocabulary's
  target ids (`draft_vocab_ids`), or None to leave draft_logits out (CAR off).
  """
  token_prob, argmax, top_logp, draft_logits = _reduce(logits, tokens[..., None], temperature, draft_ids)
  return OracleOutputs(token_prob[..., 0], argmax, top_logp, draft_logits)


def oracle_outputs(target_model, target_params, kv_cache: KVCache, seq_len: int, prefix_logits: jax.Array,
                   valid: jax.Array, anchors: jax.Array, path_tokens: jax.Array, temperature: float = 1.0,
                   draft_ids: Optional[jax.Array] = None) -> OracleOutputs:
  """The target's p_1..p_K along each path, reduced. Pure and jittable (target_model, seq_len, temperature
  static).

  Args:
    kv_cache: the target's cache holding the sequences at slots 0..seq_len-1 (`target_pass` with
      cache_slots >= oracle_slots(...)).
    prefix_logits: float32 [B, T, V] the target's logits over the sequences (row t = p(. | s[<=t])).
    valid: bool [B, T] the sequences' valid tokens (left or right padding).
    anchors: int32 [B, M]; path_tokens: int32 [B, M, S, K] target-vocabulary ids.
    temperature, draft_ids: as `reduce_logits`.
  Returns:
    OracleOutputs [B, M, S, K] (draft_logits [B, M, S, K, N]), under stop_gradient.
  """
  b, m, s, k = path_tokens.shape
  # p_1: the sequence's own row at the anchor, one distribution shared by the anchor's S paths.
  p1 = jax.vmap(lambda lg, a: lg[a])(prefix_logits, anchors)                   # [B, M, V]
  tp1, am1, top1, dl1 = _reduce(p1, path_tokens[..., 0], temperature, draft_ids)  # [B, M, S], [B, M](, N)
  per_path = lambda x: None if x is None else jnp.broadcast_to(x[:, :, None, None], (b, m, s, 1) + x.shape[2:])
  first = OracleOutputs(tp1[..., None], per_path(am1), per_path(top1), per_path(dl1))  # [B, M, S, 1](, N)
  if k == 1:
    return first
  # p_2..p_K: one tree forward over the nodes z_1..z_{K-1} of every path, reduced right after it.
  logits = _path_logits(target_model, target_params, kv_cache, seq_len, valid.astype(bool), anchors, path_tokens)
  later = reduce_logits(logits, path_tokens[..., 1:], temperature, draft_ids)
  return jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y], axis=3), first, later)


def _path_logits(target_model, target_params, kv_cache: KVCache, seq_len: int, valid: jax.Array,
                 anchors: jax.Array, path_tokens: jax.Array) -> jax.Array:
  """The target's logits float32 [B, M, S, K-1, V] of p_2..p_K: one tree forward over the nodes z_1..z_{K-1}
  of all M*S paths (path by path, `path_ancestors`), node z_k at slot T + its index, position pos(t) + k."""
  b, m, s, k = path_tokens.shape
  n = k - 1
  nodes = path_tokens[..., :n].reshape(b, m * s * n)
  depths = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, m * s, n)).reshape(b, -1)
  committed = jnp.repeat(anchors + 1, s * n, axis=1)                           # node sees slots <= t
  anchor_pos = jnp.take_along_axis(positions_from_mask(valid), anchors, axis=1)  # [B, M]
  positions = jnp.repeat(anchor_pos + 1, s * n, axis=1) + depths                # z_k at pos(t) + k
  ancestors = jnp.broadcast_to(path_ancestors(m * s, n)[None], (b, m * s * n, m * s * n))
  out = tree_forward(target_model, target_params, kv_cache, nodes, depths, ancestors, committed,
                     window_start=jnp.full((b,), seq_len, jnp.int32), positions=positions, key_valid=valid)
  return out.logits.reshape(b, m, s, n, -1)

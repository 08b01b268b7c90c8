"""Accepting draft tokens: greedy, multi-draft sampling over a top-k tree, chain speculative sampling.

Each rule returns (path int32 [B, D+1]: node index at each depth of the accepted path (entries past
`num_accepted` repeat the last accepted node), num_accepted int32 [B] draft tokens accepted, bonus
int32 [B]: the token the target contributes after them). The sampling rules preserve the target's
distribution exactly: the output is distributed as sampling the target token by token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsd_jax.decoding.sampling import warp_logits
from vsd_jax.decoding.tree import Tree


def _path_from(tree: Tree, best, depth: int):
  """Nodes on the root->best path, by depth: int32 [D+1] (past best's depth: best itself)."""
  on_path = tree.ancestors[best]                                  # [T]
  by_depth = on_path[None, :] & (tree.depths[None, :] == jnp.arange(depth + 1)[:, None])
  idx = jnp.argmax(by_depth, axis=1).astype(jnp.int32)
  return jnp.where(jnp.any(by_depth, axis=1), idx, best)


def greedy_verify(tree: Tree, logits: jax.Array, depth: int):
  """Longest path whose every token equals the target's argmax at its parent, plus the bonus argmax.

  tree: Tree with T nodes; logits: float32 [B, T, V] target logits at each node; depth: static max depth.
  """
  def row(tr, lg):
    arg = jnp.argmax(lg, axis=-1).astype(jnp.int32)               # [T]
    correct = (tr.tokens == arg[tr.parents]).at[0].set(True)
    path_ok = jnp.all(~tr.ancestors | correct[None, :], axis=1)
    best = jnp.argmax(jnp.where(path_ok, tr.depths, -1)).astype(jnp.int32)
    return _path_from(tr, best, depth), tr.depths[best], arg[best]
  return jax.vmap(row)(tree, logits)


def tree_sampling_verify(tree: Tree, logits: jax.Array, rng, depth: int, temperature: float, top_p: float = 1.0):
  """Multi-draft rule for a top-k tree: at the current node, try its children in score order; accept a
  child with its (renormalised) target probability, else zero that token and renormalise; when every
  child is rejected, sample the residual and stop. Preserves the target distribution because the
  candidates are a deterministic function of the context (sequential sampling without replacement)."""
  k = tree.children.shape[-1]

  def row(tr, lg, key):
    logp_all = warp_logits(lg, temperature, top_p)                  # [T, V]
    node, stopped, bonus = jnp.int32(0), jnp.bool_(False), jnp.int32(0)
    for d in range(depth + 1):
      p = jnp.exp(logp_all[node])
      found = jnp.int32(-1)
      for j in range(k):
        c = tr.children[node, j]
        key, sub = jax.random.split(key)
        x = tr.tokens[jnp.maximum(c, 0)]
        prob = p[x] / jnp.maximum(p.sum(), 1e-30)
        trying = (~stopped) & (found < 0) & (c >= 0)
        ok = trying & (jax.random.uniform(sub) < prob)
        found = jnp.where(ok, c, found)
        p = jnp.where(trying & ~ok, p.at[x].set(0.0), p)
      key, sub = jax.random.split(key)
      residual = jax.random.categorical(sub, jnp.log(jnp.maximum(p, 0.0)))
      stop_here = (~stopped) & (found < 0)
      bonus = jnp.where(stop_here, residual.astype(jnp.int32), bonus)
      node = jnp.where((~stopped) & (found >= 0), found, node)
      stopped = stopped | stop_here
    return _path_from(tr, node, depth), tr.depths[node], bonus

  keys = jax.random.split(rng, logits.shape[0])
  return jax.vmap(row)(tree, logits, keys)


def chain_verify(tree: Tree, logits: jax.Array, rng, draft_target_ids, temperature: float, top_p: float = 1.0):
  """Speculative sampling (Leviathan et al.) on a sampled chain: accept z_k with min(1, p/q); at the first
  rejection sample norm(max(0, p - q)); after a fully accepted chain sample p at the last node.

  tree.q_probs: [B, D+1, Vd] the draft distributions the chain was sampled from (node 0 unused);
  draft_target_ids: int32 [Vd] target id of each draft id.
  """
  depth = tree.tokens.shape[1] - 1

  def row(tr, lg, key):
    p_all = jnp.exp(warp_logits(lg, temperature, top_p))          # [D+1, V]
    q_all = jnp.zeros_like(p_all).at[:, draft_target_ids].set(tr.q_probs)
    u = jax.random.uniform(key, (depth,))
    x = tr.tokens[1:]
    p_x = jnp.take_along_axis(p_all[:-1], x[:, None], axis=1)[:, 0]
    q_x = jnp.take_along_axis(q_all[1:], x[:, None], axis=1)[:, 0]
    accept = u * q_x < p_x                                          # u < min(1, p/q), q_x > 0 when sampled
    m = jnp.argmin(jnp.concatenate([accept, jnp.array([False])])).astype(jnp.int32)  # first rejection
    residual = jnp.maximum(p_all[m] - q_all[jnp.minimum(m + 1, depth)], 0.0)
    dist = jnp.where(m < depth, residual, p_all[depth])
    key2 = jax.random.fold_in(key, 1)
    bonus = jax.random.categorical(key2, jnp.log(dist)).astype(jnp.int32)
    path = jnp.minimum(jnp.arange(depth + 1), m).astype(jnp.int32)
    return path, m, bonus

  keys = jax.random.split(rng, logits.shape[0])
  return jax.vmap(row)(tree, logits, keys)

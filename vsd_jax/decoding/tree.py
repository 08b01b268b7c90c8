"""Dynamic draft trees (EAGLE-2/3): expansion by cumulative draft log-probability, reranking, tree masks.

Everything has static shapes. A tree has T = total_tokens + 1 nodes: node 0 is the root (the last token
the target produced, not yet in its cache); nodes 1.. are draft tokens sorted so that a parent always
precedes its children. Shapes below are per row unless a leading B is shown.

Expansion state: the draft's committed KV cache ends at slot L (= the target's committed length); the
draft's output at position L-1 (`root_logits`, `root_hidden`) predicts depth-1 tokens. Depth-d frontier
nodes are fed to the draft at position L+d-1, written to scratch slots L + (d-1)*K + i.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from vsd_jax.decoding.sampling import warp_logits
from vsd_jax.models.draft_unroll import unroll_chain
from vsd_jax.models.draft_vocab import draft_to_target
from vsd_jax.models.masks import ancestor_mask, tree_attention_mask

_TIE_EPS = 1e-6  # children score strictly below parents, so top-N reranking is ancestor-closed


# The one table of decoding-shape defaults: a TreeConfig's field defaults, the values a partly given shape takes
# for the fields left out (`engine.explicit_shape`), the CLIs' help text and the benchmarks' defaults.
SHAPE_DEFAULTS = dict(depth=5, top_k=8, total_tokens=12, mode="tree")


@dataclasses.dataclass(frozen=True)
class TreeConfig:
  """depth: draft steps per round; top_k: branching; total_tokens: draft nodes verified per round.
  mode: "tree" (top-k dynamic tree; greedy or multi-draft sampling verification) or "chain" (the draft
  samples one path of `depth` tokens; speculative sampling of Leviathan et al.)."""
  depth: int = SHAPE_DEFAULTS["depth"]
  top_k: int = SHAPE_DEFAULTS["top_k"]
  total_tokens: int = SHAPE_DEFAULTS["total_tokens"]
  mode: str = SHAPE_DEFAULTS["mode"]

  def __post_init__(self):
    if self.mode not in ("tree", "chain"):
      raise ValueError(f"tree mode {self.mode!r} is not 'tree' or 'chain'")
    if self.depth < 1 or self.top_k < 1 or self.total_tokens < 1:
      raise ValueError(f"tree settings must be >= 1 (depth={self.depth}, top_k={self.top_k}, "
                       f"total_tokens={self.total_tokens})")
    if self.mode == "tree" and self.total_tokens > self.pool_size:
      raise ValueError(f"total_tokens={self.total_tokens} exceeds the {self.pool_size} candidates that depth="
                       f"{self.depth}, top_k={self.top_k} produce; lower total_tokens or raise depth/top_k")
    if self.mode == "tree" and self.top_k > 64:
      raise ValueError(f"top_k={self.top_k} is out of range (1..64)")

  @property
  def pool_size(self) -> int:
    return self.top_k + (self.depth - 1) * self.top_k * self.top_k

  @property
  def num_nodes(self) -> int:
    """Tree nodes verified per round, root included."""
    return (self.depth if self.mode == "chain" else self.total_tokens) + 1

  @property
  def scratch_slots(self) -> int:
    """Draft cache slots past the committed length that one expansion writes."""
    return max(1, (self.depth - 1) * (1 if self.mode == "chain" else self.top_k))


@flax.struct.dataclass
class Tree:
  tokens: jax.Array      # int32 [B, T] target-vocabulary ids (node 0 = root)
  parents: jax.Array     # int32 [B, T] parent node (root: 0)
  depths: jax.Array      # int32 [B, T] (root: 0)
  ancestors: jax.Array   # bool [B, T, T]: [i, j] = j is i or an ancestor of i
  scores: jax.Array      # float32 [B, T] cumulative draft log-probability of each node (root 0)
  children: jax.Array    # int32 [B, T, K] children of each node sorted by score, -1 padded
  q_probs: jax.Array     # float32 [B, T, Vd] draft distribution each node's token was sampled from (chain)


def _children(parents: jax.Array, scores: jax.Array, k: int) -> jax.Array:
  """int32 [T, k]: each node's children in descending score, -1 where fewer than k."""
  t = parents.shape[0]
  is_child = (parents[None, :] == jnp.arange(t)[:, None]) & (jnp.arange(t)[None, :] > 0)
  s = jnp.where(is_child, scores[None, :], -jnp.inf)
  top_s, top_i = jax.lax.top_k(s, min(k, t))
  return jnp.where(jnp.isfinite(top_s), top_i, -1).astype(jnp.int32)


def _rerank(cfg: TreeConfig, pool_tokens, pool_scores, pool_parents, pool_depths, root_token):
  """Pick the best total_tokens pool nodes (ancestor-closed) and lay them out as a Tree (one row)."""
  n = cfg.total_tokens
  _, sel = jax.lax.top_k(pool_scores, n)
  sel = jnp.sort(sel)  # pool order = depth order: parents before children
  tree_index = jnp.zeros((cfg.pool_size,), jnp.int32).at[sel].set(jnp.arange(1, n + 1, dtype=jnp.int32))
  par_pool = pool_parents[sel]
  parents = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.where(par_pool < 0, 0, tree_index[par_pool])])
  tokens = jnp.concatenate([root_token[None], pool_tokens[sel]])
  depths = jnp.concatenate([jnp.zeros((1,), jnp.int32), pool_depths[sel]])
  scores = jnp.concatenate([jnp.zeros((1,)), pool_scores[sel]])
  return tokens, parents, depths, scores


def expand_tree(cfg: TreeConfig, draft_fn, carry, d2t, root_token, root_logits, root_hidden, committed_len,
                rng=None, temperature=0.0, top_p: float = 1.0):
  """Grow one draft tree per row. Returns (Tree with T = cfg.num_nodes, carry).

  Args:
    cfg: TreeConfig (static). draft_fn(carry, tokens [B,k] target ids, hidden [B,k,H], positions [B,k],
      mask bool [B,k,S], write_index int32 [B]) -> (logits [B,k,Vd], hidden [B,k,H], carry)
      (`draft_unroll.draft_fn_of`); `carry` is the draft's KV cache (S slots), threaded through. Expansion
      attends to the committed slots < committed_len plus scratch slots past it, and writes there.
    d2t: int32 [Vd] draft id -> target id offset. root_token: int32 [B]. root_logits: float32 [B, Vd].
    root_hidden: [B, H]. committed_len: int32 [B]. rng/temperature/top_p: chain mode sampling.
  Returns:
    Tree with T = cfg.num_nodes.
  """
  if cfg.mode == "chain":
    return _expand_chain(cfg, draft_fn, carry, d2t, root_token, root_logits, root_hidden, committed_len, rng,
                         temperature, top_p)
  b = root_token.shape[0]
  k, depth = cfg.top_k, cfg.depth
  to_target = lambda ids: draft_to_target(ids, d2t)
  logp = jax.nn.log_softmax(root_logits, axis=-1)
  score, ids = jax.lax.top_k(logp, k)                         # [B, k]
  pool_tok, pool_score = [to_target(ids)], [score - _TIE_EPS]
  pool_par, pool_dep = [jnp.full((b, k), -1, jnp.int32)], [jnp.ones((b, k), jnp.int32)]
  front_tok, front_score, front_hidden = to_target(ids), score - _TIE_EPS, jnp.broadcast_to(
      root_hidden[:, None], (b, k, root_hidden.shape[-1]))
  front_pool = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
  scratch = cfg.scratch_slots
  front_anc = jnp.zeros((b, k, scratch), bool)              # scratch slots of ancestors (self excluded)
  base = k
  for d in range(1, depth):
    own = jax.nn.one_hot((d - 1) * k + jnp.arange(k), scratch, dtype=bool)  # [k, scratch]
    mask = tree_attention_mask(committed_len, front_anc | own[None], carry.num_slots)
    positions = committed_len[:, None] + d - 1 + jnp.zeros((1, k), jnp.int32)
    logits, hidden, carry = draft_fn(carry, front_tok, front_hidden, positions, mask, committed_len + (d - 1) * k)
    child_logp = jax.nn.log_softmax(logits, axis=-1)          # [B, k, Vd]
    c_score, c_ids = jax.lax.top_k(child_logp, k)             # [B, k, k]
    c_score = front_score[:, :, None] + c_score - _TIE_EPS
    flat_score = c_score.reshape(b, k * k)
    pool_tok.append(to_target(c_ids).reshape(b, k * k))
    pool_score.append(flat_score)
    pool_par.append(jnp.repeat(front_pool, k, axis=1))
    pool_dep.append(jnp.full((b, k * k), d + 1, jnp.int32))
    best_score, best = jax.lax.top_k(flat_score, k)           # new frontier: [B, k]
    parent = best // k
    front_anc = jnp.take_along_axis(front_anc | own[None], parent[:, :, None], axis=1)
    front_hidden = jnp.take_along_axis(hidden, parent[:, :, None], axis=1)
    front_tok = jnp.take_along_axis(pool_tok[-1], best, axis=1)
    front_score = best_score
    front_pool = base + best
    base += k * k
  cat = lambda xs: jnp.concatenate(xs, axis=1)
  tokens, parents, depths, scores = jax.vmap(lambda *a: _rerank(cfg, *a))(
      cat(pool_tok), cat(pool_score), cat(pool_par), cat(pool_dep), root_token)
  anc = jax.vmap(lambda p: ancestor_mask(p, depth))(parents)
  children = jax.vmap(lambda p, s: _children(p, s, k))(parents, scores)
  t = cfg.num_nodes
  return Tree(tokens=tokens, parents=parents, depths=depths, ancestors=anc, scores=scores,
              children=children, q_probs=jnp.zeros((b, t, 1), jnp.float32)), carry


def _expand_chain(cfg, draft_fn, carry, d2t, root_token, root_logits, root_hidden, committed_len, rng, temperature,
                  top_p):
  """Chain mode: z_1..z_D from the draft (temperature/top_p warped, or argmax at T=0), keeping each q_k.
  The draft's chain recursion is `draft_unroll.unroll_chain`, the one TTT and VSD's paths run."""
  b = root_token.shape[0]
  depth = cfg.depth

  def choose(i, logits, key):
    logq = warp_logits(logits, temperature, top_p)                     # [B, 1, Vd]
    sampled = jax.random.categorical(key, logq, axis=-1)
    ids = jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)
    # Greedy chain: the point mass on the argmax is the proposal distribution.
    q = jnp.where(temperature > 0, jnp.exp(logq), jax.nn.one_hot(ids, logits.shape[-1]))
    tok = draft_to_target(ids, d2t)
    return tok, (tok, q)

  chain = unroll_chain(draft_fn, carry, root_logits[:, None], root_hidden[:, None], (committed_len - 1)[:, None],
                       committed_len, committed_len, depth=depth, choose=choose, rng=rng,
                       reduce=lambda i, logits: None)
  toks, qs = chain.records                                              # [D, B, 1], [D, B, 1, Vd]
  t = depth + 1
  tokens = jnp.concatenate([root_token[:, None], toks[:, :, 0].T], axis=1)
  parents = jnp.broadcast_to(jnp.maximum(jnp.arange(t) - 1, 0), (b, t)).astype(jnp.int32)
  depths = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  anc = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  children = jnp.broadcast_to(jnp.where(jnp.arange(t) < depth, jnp.arange(t) + 1, -1)[:, None],
                              (b, t, 1)).astype(jnp.int32)
  q_probs = jnp.concatenate([jnp.zeros_like(qs[0]), jnp.moveaxis(qs[:, :, 0], 0, 1)], axis=1)
  return Tree(tokens=tokens, parents=parents, depths=depths, ancestors=anc,
              scores=jnp.zeros((b, t), jnp.float32), children=children, q_probs=q_probs), chain.cache


def tree_forward(model, params, kv_cache, tokens, depths, ancestors, committed_len, hidden_layers=(),
                 window_start=None, positions=None, key_valid=None):
  """The target over a tree (decoding verification and the VSD oracle share this call).

  tokens, depths: int32 [B, T]; ancestors: bool [B, T, T]; committed_len: int32 [B] (the tree's root sits
  at position/slot L), or [B, T] per node (several trees over one sequence's prefixes: node i is at
  position committed_len[i] + depths[i] and sees the slots < committed_len[i]).
  window_start: int32 [B] slot of node 0 (default committed_len, which must then be [B]).
  positions: int32 [B, T] RoPE positions of the nodes, when slot != position (a left-padded prefix);
    default committed_len + depths.
  key_valid: bool [B, S0] (S0 <= slots): the prefix slots holding real tokens (padding is never attended);
    default all.
  Writes the tree's keys/values at slots window_start .. window_start+T-1 of kv_cache.
  Returns LlamaOutput: logits float32 [B, T, V], kv_cache, hidden_states [len(hidden_layers), B, T, H].
  """
  write = committed_len if window_start is None else window_start
  mask = tree_attention_mask(committed_len, ancestors, kv_cache.num_slots, window_start)
  if key_valid is not None:
    pad = kv_cache.num_slots - key_valid.shape[1]
    mask = mask & jnp.pad(key_valid.astype(bool), ((0, 0), (0, pad)), constant_values=True)[:, None, :]
  if positions is None:
    positions = (committed_len[:, None] if committed_len.ndim == 1 else committed_len) + depths
  return model.apply({"params": params}, tokens, positions=positions, attention_mask=mask, kv_cache=kv_cache,
                     write_index=write, hidden_layers=hidden_layers)

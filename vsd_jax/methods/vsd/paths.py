"""Draft paths for VSD: the draft's own decode-time unroll from M anchors per sequence, S paths each.

Anchor t of a sequence s (context x = s[<=t]; 1 <= t): the draft's row t-1 (target features of s[t-1],
token s[t]) gives q_1, the distribution of z_1 (a candidate for s[t+1]); step k > 1 feeds z_{k-1} and the
draft's own output hidden state of step k-1, at RoPE position positions[t-1] + k - 1, exactly as tree
expansion does at decode time (`vsd_jax.decoding.tree`) and EAGLE-3's TTT step k-1 does in training.

Attention goes through the draft's ordinary cached call: slots 0..T-1 hold the sequence (step 0, causal),
the M*S path rows of step k write window slots T + (k-2)*M*S + i, and a path row sees the valid sequence
slots < t of its anchor plus its own earlier steps. Depth is `vsd_jax.models.draft_unroll.unroll_chain` (one
`jax.lax.scan`, the recursion TTT and chain decoding run), so the unroll compiles once for any K.

One function samples (E-step proposals, under stop_gradient params) and re-scores given paths (the
M-step's differentiable log-probabilities): the two share every line.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from vsd_jax.models.draft_unroll import (chain_slots, draft_fn_of, gather_rows, sequence_step, shift_left,
                                         unroll_chain, with_slots)
from vsd_jax.models.draft_vocab import draft_to_target
from vsd_jax.models.eagle3 import Eagle3Draft
from vsd_jax.models.masks import positions_from_mask


class DraftPaths(NamedTuple):
  draft_ids: jax.Array  # int32 [B, M, S, K] draft-vocabulary ids of z_1..z_K
  tokens: jax.Array     # int32 [B, M, S, K] the same as target-vocabulary ids
  logits: jax.Array     # float32 [B, M, S, K, N] the draft's raw logits of q_1..q_K along each path
  logq: jax.Array       # float32 [B, M, S, K] log q_k(z_k) at the sampling temperature


def unroll_draft_paths(draft_params, draft_module: Eagle3Draft, embed_matrix: jax.Array, features: jax.Array,
                       input_ids: jax.Array, attention_mask: jax.Array, anchors: jax.Array, d2t: jax.Array,
                       *, num_paths: int, depth: int, temperature: float = 1.0,
                       rng: Optional[jax.Array] = None, draft_ids: Optional[jax.Array] = None,
                       step0=None) -> DraftPaths:
  """Sample S draft paths of depth K per anchor (draft_ids=None), or score the given ones.

  Sampling and scoring are one pass: the ids are drawn from the logits under stop_gradient while the logits
  and logq keep their gradients, so VSD's E-step proposals (q_old = q at this step's parameters) and the
  M-step's log-probabilities come from the same unroll.

  Args:
    draft_params: the draft's params; draft_module: Eagle3Draft (static).
    embed_matrix: [V, H] the target embedding. features: [B, T, 3H] target features of the sequences.
    input_ids: int32 [B, T]; attention_mask: bool [B, T] valid tokens (left or right padding: positions
      `positions_from_mask`, padding slots never attended).
    anchors: int32 [B, M], each in [1, T-1]: the context of anchor t is s[<=t].
    d2t: int32 [N] draft id -> target id offsets.
    num_paths (S), depth (K): static. temperature: > 0, the draft's sampling temperature (q = softmax of
      logits / temperature). rng: PRNG key (sampling). draft_ids: int32 [B, M, S, K] paths to score.
    step0: the draft's step 0 over the sequences (`draft_unroll.sequence_step`), when the caller has it.
  Returns:
    DraftPaths; when scoring, draft_ids/tokens are the given paths and logits/logq carry gradients.
  """
  if temperature <= 0:
    raise ValueError(f"draft path sampling needs a temperature > 0 (got {temperature}); VSD's E-step "
                     "draws proposals from q")
  b, t = input_ids.shape
  m = anchors.shape[1]
  s, k_max = num_paths, depth
  ms = m * s
  valid = attention_mask.astype(bool)
  slots = chain_slots(t, ms, k_max)
  out0 = (sequence_step(draft_module, draft_params, embed_matrix, features, input_ids, valid, slots)
          if step0 is None else with_slots(step0, slots))
  row = anchors - 1                                                        # [B, M]: q_1 of anchor t is row t-1
  rep = lambda x: jnp.repeat(x, s, axis=1)
  given = None if draft_ids is None else draft_ids.reshape(b, ms, k_max)
  key0 = jax.random.PRNGKey(0) if rng is None else rng

  def choose(i, logits, key):
    """z_{i+1} from q_{i+1} (or the given path): (target ids to feed, draft ids to record)."""
    if given is not None:
      z = jax.lax.dynamic_index_in_dim(given, i, axis=2, keepdims=False)
    else:
      z = jax.random.categorical(key, jax.lax.stop_gradient(logits) / temperature, axis=-1).astype(jnp.int32)
    return draft_to_target(z, d2t), z

  chain = unroll_chain(draft_fn_of(draft_module, draft_params, embed_matrix, out0.image_vector), out0.kv_cache,
                       rep(gather_rows(out0.logits, row)), rep(gather_rows(out0.hidden, row)),
                       rep(jnp.take_along_axis(positions_from_mask(valid), row, axis=1)), rep(anchors),
                       jnp.full((b,), t, jnp.int32), depth=k_max, choose=choose, rng=key0, key_valid=valid)
  logits = jnp.moveaxis(chain.reduced, 0, 2).reshape(b, m, s, k_max, -1)   # [K, B, MS, N] -> [B, M, S, K, N]
  ids = jnp.moveaxis(chain.records, 0, 2).reshape(b, m, s, k_max)
  logq = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature, axis=-1), ids[..., None], axis=-1)[..., 0]
  return DraftPaths(draft_ids=ids, tokens=draft_to_target(ids, d2t), logits=logits, logq=logq)


@functools.partial(jax.jit, static_argnames=("draft_module", "num_paths", "depth", "temperature"))
def sample_draft_paths(draft_params, draft_module, embed_matrix, features, input_ids, attention_mask, anchors,
                       d2t, rng, *, num_paths: int, depth: int, temperature: float = 1.0) -> DraftPaths:
  """E-step proposals: S paths of depth K per anchor from the draft (parameters under stop_gradient).
  Shapes as `unroll_draft_paths`; jitted with draft_module, num_paths, depth, temperature static."""
  return jax.lax.stop_gradient(unroll_draft_paths(
      jax.lax.stop_gradient(draft_params), draft_module, embed_matrix, features, input_ids, attention_mask,
      anchors, d2t, num_paths=num_paths, depth=depth, temperature=temperature, rng=rng))


@functools.partial(jax.jit, static_argnames=("draft_module", "temperature"))
def score_draft_paths(draft_params, draft_module, embed_matrix, features, input_ids, attention_mask, anchors,
                      d2t, draft_ids, *, temperature: float = 1.0) -> DraftPaths:
  """The draft's logits and log q_k(z_k) along given paths draft_ids [B, M, S, K]; differentiable."""
  _, _, s, k = draft_ids.shape
  return unroll_draft_paths(draft_params, draft_module, embed_matrix, features, input_ids, attention_mask,
                            anchors, d2t, num_paths=s, depth=k, temperature=temperature, draft_ids=draft_ids)


def choose_anchors(loss_mask: jax.Array, attention_mask: jax.Array, num_anchors: int, rng: jax.Array):
  """M anchors per sequence, uniformly without replacement among the valid positions t past the first valid
  token (row t-1, which gives q_1, is then a real token) whose next token is a response token.
  loss_mask, attention_mask: [B, T] (left or right padding). Returns (anchors int32 [B, M], ok bool [B, M]);
  a sequence with fewer eligible positions gets ok=False entries (pointing at position 1)."""
  b, t = loss_mask.shape
  nxt = shift_left(loss_mask.astype(bool) & attention_mask.astype(bool), 1)
  eligible = nxt & (positions_from_mask(attention_mask) >= 1) & attention_mask.astype(bool)
  score = jnp.where(eligible, jax.random.gumbel(rng, (b, t)), -jnp.inf)
  top, idx = jax.lax.top_k(score, num_anchors)
  ok = jnp.isfinite(top)
  return jnp.where(ok, idx, 1).astype(jnp.int32), ok

"""Speculative decoding with an EAGLE-3 style draft: the whole generation is one `lax.while_loop`.

Per round: the draft grows a tree from its state at the last committed position, the target verifies
the tree in one forward (tree attention over its KV cache), the accepted path is compacted into place
in the target cache, and the draft consumes the accepted tokens with the target's features of them.
Rows advance independently (per-row committed lengths); finished rows idle until all are done.
Multimodal prompts (a LLaVA target): the images go into the target's prefill only, so the draft's prefill reads
the features of the multimodal prefill at text and image positions; every round after it is the usual one.
A draft with the vision adaptor pools the prompt's image positions at its prefill into one image vector per row
(zero for a row without images), kept in the loop state and fused into every draft call of every round.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from vsd_jax.decoding.precision import matmul_precision
from vsd_jax.decoding.sampling import sample_token
from vsd_jax.decoding.tree import TreeConfig, expand_tree, tree_forward
from vsd_jax.decoding.vanilla import is_eos
from vsd_jax.decoding.verify import chain_verify, greedy_verify, tree_sampling_verify
from vsd_jax.data.draft_vocab import draft_vocab_ids
from vsd_jax.models.draft_unroll import draft_fn_of
from vsd_jax.models.eagle3 import image_positions
from vsd_jax.models.features import embedding_matrix, fuse_features, image_inputs
from vsd_jax.models.kv_cache import KVCache, gather_slots


@flax.struct.dataclass
class SpeculativeOutput:
  tokens: jax.Array       # int32 [B, max_new_tokens], pad_id after a row stops
  num_new: jax.Array      # int32 [B] new tokens (EOS included when produced)
  rounds: jax.Array       # int32 [B] target forward passes after prefill (tau = num_new / rounds)
  accept_hist: jax.Array  # int32 [B, D+1]: rounds that accepted m = 0..D draft tokens


def required_slots(prompt_len: int, max_new_tokens: int, tree_cfg: TreeConfig) -> int:
  """Cache slots a generation needs: prompt + new tokens + one round's tree and draft scratch."""
  return prompt_len + max_new_tokens + tree_cfg.num_nodes + tree_cfg.depth + tree_cfg.scratch_slots + 2


def _write_rows(buf, new, start):
  """buf [B, N] <- new [B, W] at per-row offsets start [B] (W entries; caller masks the tail)."""
  return jax.vmap(lambda r, n, s: jax.lax.dynamic_update_slice(r, n, (s,)))(buf, new, start)


@functools.partial(jax.jit, static_argnames=(
    "target_model", "draft_model", "tree_cfg", "max_new_tokens", "cache_slots", "eos_ids", "temperature",
    "top_p", "pad_id", "precision"))
def speculative_generate(target_model, target_params, draft_model, draft_params, d2t, prompt_ids, prompt_lens,
                         rng, *, tree_cfg: TreeConfig, max_new_tokens: int, cache_slots: int,
                         eos_ids: tuple = (), temperature: float = 0.0, top_p: float = 1.0,
                         pad_id: int = 0, precision: Optional[str] = None, pixel_values=None,
                         image_features=None) -> SpeculativeOutput:
  """Generate with draft trees verified by the target; lossless for greedy and sampled decoding.

  Args:
    target_model: LlamaForCausalLM (static); target_params: its params.
    draft_model: Eagle3Draft (static); draft_params: its params (the target's embedding is shared).
    d2t: int32 [Vd] draft id -> target id offsets.
    prompt_ids: int32 [B, P] right-padded; prompt_lens: int32 [B].
    rng: PRNG key. tree_cfg: TreeConfig (static); the fastest for this device, target and draft comes from
      `vsd_jax.decoding.autotune.choose_shape(...).shape` (what generate and evaluate use by default). temperature (static): 0 = greedy verification;
      > 0: tree mode uses the multi-draft rule, chain mode speculative sampling.
    max_new_tokens, cache_slots (>= required_slots(P, max_new_tokens, tree_cfg)), eos_ids, pad_id: static.
    precision: static matmul precision of target and draft, 'default' | 'high' | 'highest'
      (decoding/precision.py; 'highest' for T=0 output identical to vanilla on GPUs); None = JAX's setting.
    pixel_values / image_features: a LLaVA target's images, used by the prefill only (see vanilla.generate);
      a draft with the vision adaptor (draft_model.cfg.vision_adaptor) needs the LLaVA target it was trained for.
  Returns:
    SpeculativeOutput(tokens [B, max_new_tokens], num_new [B], rounds [B], accept_hist [B, D+1]).
  """
  with matmul_precision(precision):
    return _speculative_generate(target_model, target_params, draft_model, draft_params, d2t, prompt_ids,
                                 prompt_lens, rng, tree_cfg, max_new_tokens, cache_slots, eos_ids, temperature,
                                 top_p, pad_id, dict(pixel_values=pixel_values, image_features=image_features))


def _speculative_generate(target_model, target_params, draft_model, draft_params, d2t, prompt_ids, prompt_lens,
                          rng, tree_cfg, max_new_tokens, cache_slots, eos_ids, temperature, top_p,
                          pad_id, images=None) -> SpeculativeOutput:
  tcfg = target_model.cfg
  dcfg = draft_model.cfg
  if dcfg.vision_adaptor and getattr(tcfg, "image_token_id", None) != dcfg.image_token_id:
    have = ("is a text model" if getattr(tcfg, "image_token_id", None) is None
            else f"has image token {tcfg.image_token_id}")
    raise ValueError(f"speculative_generate: the draft has a vision adaptor for image token {dcfg.image_token_id} "
                     f"but the target {have}; decode with the multimodal target the draft was trained for")
  layers = tcfg.eagle3_layers
  b, p = prompt_ids.shape
  depth = tree_cfg.depth
  width = depth + 1                      # most tokens one round commits (accepted + bonus)
  embed = embedding_matrix(target_params)
  draft_target_ids = draft_vocab_ids(d2t)

  # Prefill the target; its first token is the first root.
  tcache = KVCache.zeros(tcfg, b, cache_slots)
  out = target_model.apply({"params": target_params}, prompt_ids, kv_cache=tcache,
                           write_index=jnp.zeros_like(prompt_lens), hidden_layers=layers,
                           logits_at=prompt_lens - 1, **image_inputs(images or {}))
  last_logits = out.logits[:, 0]
  rng, sub = jax.random.split(rng)
  root = sample_token(last_logits, sub, temperature, top_p)

  # Draft prefill: entry j pairs the target feature of position j with token j+1 (the root at P-1).
  shifted = jnp.concatenate([prompt_ids[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
  draft_in = jnp.where(jnp.arange(p)[None, :] == (prompt_lens - 1)[:, None], root[:, None], shifted)
  dcache = KVCache.zeros(draft_model.cfg.layer_config, b, cache_slots)
  in_prompt = jnp.arange(p)[None, :] < prompt_lens[:, None]
  dout = draft_model.apply({"params": draft_params}, embed, draft_in, fuse_features(out.hidden_states),
                           kv_cache=dcache, write_index=jnp.zeros_like(prompt_lens),
                           image_mask=image_positions(dcfg, prompt_ids, in_prompt))
  pick = lambda a, i: jnp.take_along_axis(a, i[:, None, None], axis=1)[:, 0]
  state = dict(
      tcache=out.kv_cache, dcache=dout.kv_cache, length=prompt_lens, root=root,
      root_logits=pick(dout.logits, prompt_lens - 1), root_hidden=pick(dout.hidden, prompt_lens - 1),
      tokens=jnp.full((b, max_new_tokens + width), pad_id, jnp.int32).at[:, 0].set(root),
      num_new=jnp.ones((b,), jnp.int32), done=is_eos(root, eos_ids) | (max_new_tokens <= 1),
      rounds=jnp.zeros((b,), jnp.int32), hist=jnp.zeros((b, width), jnp.int32), rng=rng,
      image_vector=dout.image_vector)  # [B, H] with the vision adaptor, else None

  def cond(s):
    return ~jnp.all(s["done"])

  def body(s):
    rng, k_tree, k_verify = jax.random.split(s["rng"], 3)
    length = s["length"]
    draft_fn = draft_fn_of(draft_model, draft_params, embed, s["image_vector"])
    tree, dcache = expand_tree(tree_cfg, draft_fn, s["dcache"], d2t, s["root"],
                               s["root_logits"], s["root_hidden"], length, k_tree, temperature, top_p)
    vout = tree_forward(target_model, target_params, s["tcache"], tree.tokens, tree.depths, tree.ancestors,
                        length, hidden_layers=layers)
    if temperature <= 0:
      path, m, bonus = greedy_verify(tree, vout.logits, depth)
    elif tree_cfg.mode == "chain":
      path, m, bonus = chain_verify(tree, vout.logits, k_verify, draft_target_ids, temperature, top_p)
    else:
      path, m, bonus = tree_sampling_verify(tree, vout.logits, k_verify, depth, temperature, top_p)
    tcache = gather_slots(vout.kv_cache, length[:, None] + path, length)

    # Committed tokens this round: the accepted drafts then the bonus; cut at EOS and max_new_tokens.
    idx = jnp.arange(width, dtype=jnp.int32)[None, :]
    path_tokens = jnp.take_along_axis(tree.tokens, path, axis=1)
    new = jnp.where(idx < m[:, None], jnp.roll(path_tokens, -1, axis=1), bonus[:, None])
    new = jnp.where(idx <= m[:, None], new, pad_id)
    eos_at = jnp.where(is_eos(new, eos_ids) & (idx <= m[:, None]), idx, width)
    first_eos = jnp.min(eos_at, axis=1)
    count = jnp.minimum(jnp.minimum(m + 1, first_eos + 1), max_new_tokens - s["num_new"])
    running = ~s["done"]
    count = jnp.where(running, count, 0)
    new = jnp.where(idx < count[:, None], new, pad_id)
    tokens = _write_rows(s["tokens"], new, s["num_new"])
    num_new = s["num_new"] + count
    done = s["done"] | (first_eos < width) | (num_new >= max_new_tokens)

    # The draft consumes the committed tokens with the target's features of the nodes before them.
    feats = fuse_features(vout.hidden_states)
    feats = jnp.take_along_axis(feats, path[:, :, None], axis=1)
    dout = draft_model.apply({"params": draft_params}, embed, new, feats, kv_cache=dcache, write_index=length,
                             image_vector=s["image_vector"])
    new_length = length + m + 1
    keep = lambda a, b_: jnp.where(running.reshape((-1,) + (1,) * (a.ndim - 1)), a, b_)
    return dict(
        tcache=tcache, dcache=dout.kv_cache, length=keep(new_length, length), root=keep(bonus, s["root"]),
        root_logits=keep(pick(dout.logits, m), s["root_logits"]), root_hidden=keep(pick(dout.hidden, m), s["root_hidden"]),
        tokens=tokens, num_new=num_new, done=done, rounds=s["rounds"] + running,
        hist=s["hist"] + (running[:, None] & (jnp.arange(width)[None, :] == m[:, None])), rng=rng,
        image_vector=s["image_vector"])

  s = jax.lax.while_loop(cond, body, state)
  return SpeculativeOutput(tokens=s["tokens"][:, :max_new_tokens], num_new=s["num_new"], rounds=s["rounds"],
                           accept_hist=s["hist"])

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

import dataclasses
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
from vsd_jax.models.draft_unroll import draft_fn_of
from vsd_jax.models.draft_vocab import draft_vocab_ids
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


def write_rows(buf, new, start):
  """buf [B, N] <- new [B, W] at per-row offsets start [B] (W entries; caller masks the tail)."""
  return jax.vmap(lambda r, n, s: jax.lax.dynamic_update_slice(r, n, (s,)))(buf, new, start)


def _pick(a, i):
  """a [B, T, ...] -> a[b, i[b]] [B, ...]."""
  return jnp.take_along_axis(a, i[:, None, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Round:
  """The prefill and the round of `speculative_generate`, split into the parts a round is made of.

  Static settings only (hashable, so a Round is a static argument of the jitted functions below); every method is
  a pure function of parameters and arrays. The round's state is the dict the loop carries:
    tcache / dcache  target / draft KVCache (cache_slots slots); length int32 [B] committed tokens per row;
    root int32 [B] the last committed token (not yet in the caches); root_logits float32 [B, Vd] and root_hidden
    [B, H] the draft's output predicting depth 1; tokens int32 [B, max_new_tokens + D + 1] new tokens so far
    (pad_id after); num_new int32 [B]; done bool [B]; rounds int32 [B]; hist int32 [B, D+1] rounds by accepted
    count; rng PRNG key; image_vector [B, H] with the draft's vision adaptor, else None.
  `benchmarks/round_profile.py` times these parts one by one.
  """
  target_model: object
  draft_model: object
  tree_cfg: TreeConfig
  max_new_tokens: int
  eos_ids: tuple = ()
  temperature: float = 0.0
  top_p: float = 1.0
  pad_id: int = 0

  @property
  def width(self) -> int:
    """Most tokens one round commits (accepted + bonus)."""
    return self.tree_cfg.depth + 1

  def prefill(self, target_params, draft_params, prompt_ids, prompt_lens, rng, cache_slots: int,
              images=None) -> dict:
    """Target prefill (its first token is the first root), then the draft's prefill: entry j pairs the target
    feature of position j with token j+1 (the root at P-1). prompt_ids int32 [B, P]; prompt_lens int32 [B].
    images: dict(pixel_values=..., image_features=...) for a LLaVA target. -> the round's state."""
    tcfg, dcfg = self.target_model.cfg, self.draft_model.cfg
    if dcfg.vision_adaptor and getattr(tcfg, "image_token_id", None) != dcfg.image_token_id:
      have = ("is a text model" if getattr(tcfg, "image_token_id", None) is None
              else f"has image token {tcfg.image_token_id}")
      raise ValueError(f"speculative_generate: the draft has a vision adaptor for image token {dcfg.image_token_id} "
                       f"but the target {have}; decode with the multimodal target the draft was trained for")
    b, p = prompt_ids.shape
    embed = embedding_matrix(target_params)
    out = self.target_model.apply({"params": target_params}, prompt_ids, kv_cache=KVCache.zeros(tcfg, b, cache_slots),
                                  write_index=jnp.zeros_like(prompt_lens), hidden_layers=tcfg.eagle3_layers,
                                  logits_at=prompt_lens - 1, **image_inputs(images or {}))
    rng, sub = jax.random.split(rng)
    root = sample_token(out.logits[:, 0], sub, self.temperature, self.top_p)
    shifted = jnp.concatenate([prompt_ids[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    draft_in = jnp.where(jnp.arange(p)[None, :] == (prompt_lens - 1)[:, None], root[:, None], shifted)
    in_prompt = jnp.arange(p)[None, :] < prompt_lens[:, None]
    dout = self.draft_model.apply({"params": draft_params}, embed, draft_in, fuse_features(out.hidden_states),
                                  kv_cache=KVCache.zeros(dcfg.layer_config, b, cache_slots),
                                  write_index=jnp.zeros_like(prompt_lens),
                                  image_mask=image_positions(dcfg, prompt_ids, in_prompt))
    return dict(
        tcache=out.kv_cache, dcache=dout.kv_cache, length=prompt_lens, root=root,
        root_logits=_pick(dout.logits, prompt_lens - 1), root_hidden=_pick(dout.hidden, prompt_lens - 1),
        tokens=jnp.full((b, self.max_new_tokens + self.width), self.pad_id, jnp.int32).at[:, 0].set(root),
        num_new=jnp.ones((b,), jnp.int32), done=is_eos(root, self.eos_ids) | (self.max_new_tokens <= 1),
        rounds=jnp.zeros((b,), jnp.int32), hist=jnp.zeros((b, self.width), jnp.int32), rng=rng,
        image_vector=dout.image_vector)

  def expand(self, target_params, draft_params, d2t, dcache, root, root_logits, root_hidden, length, key,
             image_vector=None):
    """The draft's tree (T = tree_cfg.num_nodes nodes) from the round's root -> (Tree, dcache)."""
    draft_fn = draft_fn_of(self.draft_model, draft_params, embedding_matrix(target_params), image_vector)
    return expand_tree(self.tree_cfg, draft_fn, dcache, d2t, root, root_logits, root_hidden, length, key,
                       self.temperature, self.top_p)

  def verify(self, target_params, tcache, tree, length):
    """The target over the tree (one forward, tree attention) -> LlamaOutput (logits [B, T, V], kv_cache,
    hidden_states)."""
    return tree_forward(self.target_model, target_params, tcache, tree.tokens, tree.depths, tree.ancestors, length,
                        hidden_layers=self.target_model.cfg.eagle3_layers)

  def accept(self, tree, logits, key, d2t):
    """The verification rule -> (path int32 [B, D+1] accepted nodes, m int32 [B] accepted drafts, bonus [B])."""
    if self.temperature <= 0:
      return greedy_verify(tree, logits, self.tree_cfg.depth)
    if self.tree_cfg.mode == "chain":
      return chain_verify(tree, logits, key, draft_vocab_ids(d2t), self.temperature, self.top_p)
    return tree_sampling_verify(tree, logits, key, self.tree_cfg.depth, self.temperature, self.top_p)

  @staticmethod
  def kv_update(tcache, path, length):
    """The accepted path compacted into place in the target cache."""
    return gather_slots(tcache, length[:, None] + path, length)

  def commit(self, tokens, num_new, done, tree_tokens, path, m, bonus):
    """Committed tokens this round: the accepted drafts then the bonus; cut at EOS and max_new_tokens.
    -> (new int32 [B, D+1] (pad_id past them), tokens, num_new, done, running bool [B])."""
    width = self.width
    idx = jnp.arange(width, dtype=jnp.int32)[None, :]
    path_tokens = jnp.take_along_axis(tree_tokens, path, axis=1)
    new = jnp.where(idx < m[:, None], jnp.roll(path_tokens, -1, axis=1), bonus[:, None])
    new = jnp.where(idx <= m[:, None], new, self.pad_id)
    eos_at = jnp.where(is_eos(new, self.eos_ids) & (idx <= m[:, None]), idx, width)
    first_eos = jnp.min(eos_at, axis=1)
    count = jnp.minimum(jnp.minimum(m + 1, first_eos + 1), self.max_new_tokens - num_new)
    running = ~done
    count = jnp.where(running, count, 0)
    new = jnp.where(idx < count[:, None], new, self.pad_id)
    tokens = write_rows(tokens, new, num_new)
    num_new = num_new + count
    return new, tokens, num_new, done | (first_eos < width) | (num_new >= self.max_new_tokens), running

  def draft_update(self, target_params, draft_params, dcache, new, hidden_states, path, length, image_vector=None):
    """The draft consumes the committed tokens with the target's features of the nodes before them."""
    feats = jnp.take_along_axis(fuse_features(hidden_states), path[:, :, None], axis=1)
    return self.draft_model.apply({"params": draft_params}, embedding_matrix(target_params), new, feats,
                                  kv_cache=dcache, write_index=length, image_vector=image_vector)

  def step(self, target_params, draft_params, d2t, s: dict) -> dict:
    """One round: expand, verify, accept, compact, commit, update the draft. Rows that are done keep their state."""
    rng, k_tree, k_verify = jax.random.split(s["rng"], 3)
    length = s["length"]
    tree, dcache = self.expand(target_params, draft_params, d2t, s["dcache"], s["root"], s["root_logits"],
                               s["root_hidden"], length, k_tree, s["image_vector"])
    vout = self.verify(target_params, s["tcache"], tree, length)
    path, m, bonus = self.accept(tree, vout.logits, k_verify, d2t)
    tcache = self.kv_update(vout.kv_cache, path, length)
    new, tokens, num_new, done, running = self.commit(s["tokens"], s["num_new"], s["done"], tree.tokens, path, m,
                                                      bonus)
    dout = self.draft_update(target_params, draft_params, dcache, new, vout.hidden_states, path, length,
                             s["image_vector"])
    keep = lambda a, b_: jnp.where(running.reshape((-1,) + (1,) * (a.ndim - 1)), a, b_)  # noqa: E731
    return dict(
        tcache=tcache, dcache=dout.kv_cache, length=keep(length + m + 1, length), root=keep(bonus, s["root"]),
        root_logits=keep(_pick(dout.logits, m), s["root_logits"]),
        root_hidden=keep(_pick(dout.hidden, m), s["root_hidden"]),
        tokens=tokens, num_new=num_new, done=done, rounds=s["rounds"] + running,
        hist=s["hist"] + (running[:, None] & (jnp.arange(self.width)[None, :] == m[:, None])), rng=rng,
        image_vector=s["image_vector"])

  def output(self, s: dict) -> SpeculativeOutput:
    return SpeculativeOutput(tokens=s["tokens"][:, :self.max_new_tokens], num_new=s["num_new"], rounds=s["rounds"],
                             accept_hist=s["hist"])


@functools.partial(jax.jit, static_argnames=("round_", "cache_slots", "precision"))
def speculative_prefill(round_: Round, target_params, draft_params, prompt_ids, prompt_lens, rng, *,
                        cache_slots: int, precision: Optional[str] = None, pixel_values=None,
                        image_features=None) -> dict:
  """The prefill of `speculative_generate` alone: prompt_ids int32 [B, P] right-padded, prompt_lens int32 [B],
  rng a PRNG key, cache_slots (static, >= required_slots(P, round_.max_new_tokens, round_.tree_cfg)), precision
  (static). Returns the round's state (see `Round`): caches of cache_slots slots, tokens [B, max_new_tokens + D + 1],
  per-row vectors [B]."""
  with matmul_precision(precision):
    return round_.prefill(target_params, draft_params, prompt_ids, prompt_lens, rng, cache_slots,
                          dict(pixel_values=pixel_values, image_features=image_features))


@functools.partial(jax.jit, static_argnames=("round_", "precision"), donate_argnames=("state",))
def speculative_round(round_: Round, target_params, draft_params, d2t, state: dict, *,
                      precision: Optional[str] = None) -> dict:
  """One round of `speculative_generate`'s loop: d2t int32 [Vd]; state the dict `speculative_prefill` returns (its
  shapes kept; donated: the caches are updated in place, as in the loop). Returns the next state."""
  with matmul_precision(precision):
    return round_.step(target_params, draft_params, d2t, state)


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
      `vsd_jax.engine.Engine.choose_shape` (what generate and evaluate use by default). temperature
      (static): 0 = greedy verification; > 0: tree mode uses the multi-draft rule, chain mode speculative sampling.
    max_new_tokens, cache_slots (>= required_slots(P, max_new_tokens, tree_cfg)), eos_ids, pad_id: static.
    precision: static matmul precision of target and draft, 'default' | 'high' | 'highest'
      (decoding/precision.py; 'highest' for T=0 output identical to vanilla on GPUs); None = JAX's setting.
    pixel_values / image_features: a LLaVA target's images, used by the prefill only (see vanilla.generate);
      a draft with the vision adaptor (draft_model.cfg.vision_adaptor) needs the LLaVA target it was trained for.
  Returns:
    SpeculativeOutput(tokens [B, max_new_tokens], num_new [B], rounds [B], accept_hist [B, D+1]).
  """
  r = Round(target_model, draft_model, tree_cfg, max_new_tokens, eos_ids, temperature, top_p, pad_id)
  with matmul_precision(precision):
    state = r.prefill(target_params, draft_params, prompt_ids, prompt_lens, rng, cache_slots,
                      dict(pixel_values=pixel_values, image_features=image_features))
    state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), lambda s: r.step(target_params, draft_params, d2t, s),
                               state)
  return r.output(state)

"""A tiny LLaMA target with a peaked (non-uniform) next-token distribution and an EAGLE-3 draft trained
on it for a few seconds: small enough for statistical tests with tens of thousands of samples."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from vsd_jax.decoding.vanilla import generate
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
from vsd_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vsd_jax.methods.eagle3.loss import eagle3_loss
from vsd_jax.models.features import target_features


# Architecture -> the LlamaConfig fields of a tiny target of it: Qwen2's q/k/v biases, Qwen3's q/k norms with a
# head_dim whose q width (4 * 16) differs from the hidden size, Mistral's sliding window shorter than the sequences.
ARCH_FIELDS = {"llama": dict(), "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True, head_dim=16),
               "mistral": dict(sliding_window=6)}


def tiny_target(vocab=8, seed=0, scale=12.0, arch="llama"):
  """Random tiny target of architecture `arch` (ARCH_FIELDS); the embedding is scaled up so that the next-token
  distributions are peaked. Biases and q/k norm scales (initialised to 0 and 1) are perturbed so that they matter."""
  fields = dict(dict(head_dim=8), **ARCH_FIELDS[arch])
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                    num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=512, **fields)
  model = LlamaForCausalLM(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * scale
  if arch != "llama":
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype)
        if any(getattr(k, "key", None) in ("bias", "q_norm", "k_norm") for k in path) else x, params)
  return model, params


def init_draft_params(cfg: Eagle3Config, rng, embed_matrix):
  """Random draft parameters (unboxed "params") for tests. embed_matrix: [V, H] the target's embedding."""
  model = Eagle3Draft(cfg)
  ids = jnp.zeros((1, 2), jnp.int32)
  feats = jnp.zeros((1, 2, 3 * cfg.hidden_size), cfg.jnp_dtype)
  return jax.jit(lambda r, e: nn.unbox(model.init(r, e, ids, feats)["params"]))(rng, embed_matrix)


def vocab_maps(vocab, draft_ids):
  """(d2t, t2d) of a draft vocabulary given its sorted target ids."""
  draft_ids = np.asarray(sorted(draft_ids))
  d2t = jnp.asarray(draft_ids - np.arange(len(draft_ids)), jnp.int32)
  t2d = jnp.zeros((vocab,), bool).at[draft_ids].set(True)
  return d2t, t2d


@functools.lru_cache(maxsize=None)
def tiny_setup(vocab=8, draft_vocab=6, train_steps=150, seed=0, arch="llama"):
  """-> (target model, target params, draft module, trained draft params, random draft params, d2t, t2d)."""
  model, params = tiny_target(vocab, seed, arch=arch)
  d2t, t2d = vocab_maps(vocab, range(vocab - draft_vocab, vocab))  # drop the lowest ids: exercises d2t
  dcfg = Eagle3Config.from_target(model.cfg, draft_vocab_size=draft_vocab)
  draft = Eagle3Draft(dcfg)
  embed = params["embed_tokens"]["embedding"]
  random_params = init_draft_params(dcfg, jax.random.PRNGKey(seed + 1), embed)
  # Training data: 256 sampled continuations of random 4-token prompts.
  prompts = jax.random.randint(jax.random.PRNGKey(seed + 2), (256, 4), 0, vocab)
  out = generate(model, params, prompts, jnp.full((256,), 4, jnp.int32), jax.random.PRNGKey(seed + 3), 0.7,
                 max_new_tokens=28, cache_slots=64)
  seqs = jnp.concatenate([prompts, out.tokens], axis=1)
  feats, logits = target_features(model, params, seqs)
  mask = jnp.arange(seqs.shape[1])[None, :] >= 4
  tx = optax.adam(3e-3)

  @jax.jit  # data as arguments, not closed-over constants (XLA would constant-fold them for minutes)
  def step(p, opt, feats, seqs, logits, mask):
    (loss, _), g = jax.value_and_grad(
        lambda p_: eagle3_loss(p_, draft, embed, feats, seqs, logits, mask, t2d, d2t, num_steps=4), has_aux=True)(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  trained, opt = random_params, tx.init(random_params)
  for _ in range(train_steps):
    trained, opt, _ = step(trained, opt, feats, seqs, logits, mask)
  return model, params, draft, trained, random_params, d2t, t2d


@functools.lru_cache(maxsize=None)
def tiny_random_setup(seed=0):
  """A tiny float32 target (vocabulary 8), a random draft over its ids 2..7 (so small that its top-3 often holds
  the target's argmax: drafts get accepted without training), 3 right-padded prompts of different lengths.
  -> (target model, params, draft module, draft params, d2t, prompts int32 [3, 7], lens int32 [3])."""
  model, params = tiny_target(vocab=8, seed=seed)
  dcfg = Eagle3Config.from_target(model.cfg, draft_vocab_size=6)
  d2t, _ = vocab_maps(8, range(2, 8))
  dp = init_draft_params(dcfg, jax.random.PRNGKey(seed + 1), params["embed_tokens"]["embedding"])
  prompts = jax.random.randint(jax.random.PRNGKey(seed + 2), (3, 7), 0, 8)
  return model, params, Eagle3Draft(dcfg), dp, d2t, prompts, jnp.asarray([7, 4, 6], jnp.int32)

"""Speculative decoding is lossless: T=0 equals vanilla greedy; T>0 samples the target's distribution.

The statistical tests use a tiny target (vocabulary 8, peaked distributions) whose exact distribution of
the first three new tokens is enumerated (8^3 = 512 outcomes) and compared with N_SAMPLES speculative
samples by a chi-square goodness-of-fit test (outcomes pooled so every expected count is >= 5).
Power: the same test, on the same number of samples, rejects a sampler whose only error is reading the
draft distribution in place of the target's for the second token (an "accept-always" verifier), see
`test_statistical_test_has_power`; the p-value threshold is 1e-3.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tests.tiny_models import tiny_setup
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.decoding.vanilla import generate

pytestmark = pytest.mark.slow  # every test needs tiny_setup() (a draft trained for 150 steps: ~50 s)

N_SAMPLES = 20000
PROMPT = [3, 1, 4, 1]
TREE = TreeConfig(depth=3, top_k=3, total_tokens=8, mode="tree")
CHAIN = TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain")


@pytest.fixture(scope="module")
def tiny():
  return tiny_setup()


def _spec(tiny, draft_params, tree_cfg, prompts, lens, seed, temperature, max_new):
  model, params, draft, _, _, d2t, _ = tiny
  return speculative_generate(model, params, draft, draft_params, d2t, prompts, lens, jax.random.PRNGKey(seed),
                              tree_cfg=tree_cfg, max_new_tokens=max_new, temperature=temperature,
                              cache_slots=required_slots(prompts.shape[1], max_new, tree_cfg))


def test_greedy_equals_vanilla_batched_tiny(tiny):
  """T=0 with a trained and a random draft, tree and chain, B=6 prompts of different lengths; and the
  trained draft really accepts tokens (the compaction path is exercised)."""
  model, params, draft, trained, random_params, d2t, _ = tiny
  rng = np.random.RandomState(0)
  lens = np.array([3, 7, 5, 9, 4, 6], np.int32)
  prompts = np.zeros((6, 9), np.int32)
  for i, n in enumerate(lens):
    prompts[i, :n] = rng.randint(0, 8, n)
  prompts, lens = jnp.asarray(prompts), jnp.asarray(lens)
  ref = generate(model, params, prompts, lens, jax.random.PRNGKey(0), 0.0, max_new_tokens=40, cache_slots=128)
  for dp, cfg in itertools.product([trained, random_params], [TREE, CHAIN]):
    out = _spec(tiny, dp, cfg, prompts, lens, 0, 0.0, 40)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.num_new), np.asarray(ref.num_new))
    one = [_spec(tiny, dp, cfg, prompts[i:i + 1], lens[i:i + 1], 0, 0.0, 40).tokens[0] for i in (0, 3)]
    np.testing.assert_array_equal(np.asarray(one), np.asarray(out.tokens)[[0, 3]])
  trained_out = _spec(tiny, trained, TREE, prompts, lens, 0, 0.0, 40)
  tau = float(trained_out.num_new.sum() / trained_out.rounds.sum())
  assert tau > 1.5, f"the trained draft should be accepted (tau {tau})"
  assert int(trained_out.accept_hist[:, 1:].sum()) > 0


def _exact_three_token_distribution(tiny):
  """p(x1, x2, x3 | PROMPT) at T=1 by enumeration with plain target forwards. -> [8, 8, 8]."""
  model, params = tiny[0], tiny[1]
  v = model.cfg.vocab_size
  seqs = np.array([PROMPT + list(x) for x in itertools.product(range(v), repeat=2)], np.int32)  # [64, 6]
  logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(seqs)).logits, axis=-1)
  logp = np.asarray(logp, np.float64)
  p1 = np.exp(logp[0, 3])                                   # next token after the prompt
  p2 = np.exp(logp[::v, 4]).reshape(v, v)                   # [x1, x2]
  p3 = np.exp(logp[:, 5]).reshape(v, v, v)                  # [x1, x2, x3]
  p = p1[:, None, None] * p2[:, :, None] * p3
  return p / p.sum()


def _chi2_pvalue(samples, expected_p):
  """samples int [N, 3]; expected_p [8, 8, 8]. Outcomes with expected count < 5 are pooled."""
  v = expected_p.shape[0]
  idx = samples[:, 0] * v * v + samples[:, 1] * v + samples[:, 2]
  counts = np.bincount(idx, minlength=v ** 3).astype(np.float64)
  exp = expected_p.reshape(-1) * len(samples)
  big = exp >= 5
  obs = np.append(counts[big], counts[~big].sum())
  ex = np.append(exp[big], exp[~big].sum())
  if ex[-1] == 0:
    obs, ex = obs[:-1], ex[:-1]
  return stats.chisquare(obs, ex).pvalue


def _spec_samples(tiny, draft_params, cfg, seed):
  prompts = jnp.asarray([PROMPT] * N_SAMPLES, jnp.int32)
  lens = jnp.full((N_SAMPLES,), len(PROMPT), jnp.int32)
  return np.asarray(_spec(tiny, draft_params, cfg, prompts, lens, seed, 1.0, 3).tokens)


@pytest.mark.parametrize("mode", ["tree", "chain"])
@pytest.mark.parametrize("which", ["trained", "random"])
def test_sampling_matches_target_distribution(tiny, mode, which):
  exact = _exact_three_token_distribution(tiny)
  dp = tiny[3] if which == "trained" else tiny[4]
  samples = _spec_samples(tiny, dp, TREE if mode == "tree" else CHAIN, seed=11)
  assert _chi2_pvalue(samples, exact) > 1e-3


def test_vanilla_sampling_matches_the_same_reference(tiny):
  model, params = tiny[0], tiny[1]
  prompts = jnp.asarray([PROMPT] * N_SAMPLES, jnp.int32)
  out = generate(model, params, prompts, jnp.full((N_SAMPLES,), 4, jnp.int32), jax.random.PRNGKey(5), 1.0,
                 max_new_tokens=3, cache_slots=16)
  assert _chi2_pvalue(np.asarray(out.tokens), _exact_three_token_distribution(tiny)) > 1e-3


def test_statistical_test_has_power(tiny):
  """A biased sampler: x2 drawn from the trained draft instead of the target. Must be rejected."""
  model, params, draft, trained, _, d2t, _ = tiny
  exact = _exact_three_token_distribution(tiny)
  # Exact draft distribution for x2 given (prompt, x1): q over the draft vocab mapped to target ids.
  from vsd_jax.models.features import target_features
  v = model.cfg.vocab_size
  seqs = jnp.asarray([PROMPT + [x] for x in range(v)], jnp.int32)
  feats, _ = target_features(model, params, seqs)
  dout = draft.apply({"params": trained}, params["embed_tokens"]["embedding"], jnp.roll(seqs, -1, axis=1), feats)
  q = np.zeros((v, v))
  q[:, np.arange(d2t.shape[0]) + np.asarray(d2t)] = np.asarray(jax.nn.softmax(dout.logits[:, 3], -1))
  biased = exact.sum(axis=(1, 2))[:, None, None] * q[:, :, None] * (exact / exact.sum(2, keepdims=True).clip(1e-30))
  rng = np.random.default_rng(0)
  flat = rng.choice(v ** 3, size=N_SAMPLES, p=biased.reshape(-1) / biased.sum())
  samples = np.stack([flat // (v * v), (flat // v) % v, flat % v], axis=1)
  assert _chi2_pvalue(samples, exact) < 1e-3


def test_greedy_lossless_under_x64():
  """In float64 (jax_enable_x64) there are no near-ties to excuse: outputs must be identical."""
  import os
  import subprocess
  import sys
  code = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from flax import linen as nn
from tests.tiny_models import tiny_target, vocab_maps
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
from tests.tiny_models import init_draft_params
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.decoding.vanilla import generate
model, params = tiny_target(vocab=64)
cfg = model.cfg.replace(dtype="float64", param_dtype="float64")
model = type(model)(cfg)
params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
dcfg = Eagle3Config.from_target(cfg, draft_vocab_size=48)
d2t, _ = vocab_maps(64, range(16, 64))
dp = init_draft_params(dcfg, jax.random.PRNGKey(1), params["embed_tokens"]["embedding"])
prompts = jax.random.randint(jax.random.PRNGKey(2), (4, 6), 0, 64)
lens = jnp.full((4,), 6, jnp.int32)
tree = TreeConfig(depth=4, top_k=4, total_tokens=10)
s = speculative_generate(model, params, Eagle3Draft(dcfg), dp, d2t, prompts, lens, jax.random.PRNGKey(0),
                         tree_cfg=tree, max_new_tokens=48, cache_slots=required_slots(6, 48, tree))
v = generate(model, params, prompts, lens, jax.random.PRNGKey(0), 0.0, max_new_tokens=48, cache_slots=64)
assert s.tokens.dtype == jnp.int32 and params["embed_tokens"]["embedding"].dtype == jnp.float64
print("MISMATCHES", int((np.asarray(s.tokens) != np.asarray(v.tokens)).sum()))
"""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, PYTHONPATH=repo))
  assert "MISMATCHES 0" in r.stdout, r.stdout[-1000:] + r.stderr[-3000:]

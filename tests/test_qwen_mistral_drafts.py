"""EAGLE-3 and VSD drafts for Qwen2, Qwen3 and Mistral targets (tiny random JAX targets of each architecture,
`tiny_models.ARCH_FIELDS`; Mistral's sliding window is shorter than the sequences): lossless T=0 speculative
decoding (identical to vanilla) with random and trained drafts, EAGLE-3 training, and VSD's train step."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import init_draft_params, tiny_setup, tiny_target, vocab_maps
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.decoding.vanilla import generate
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft

ARCHS = ["qwen2", "qwen3", "mistral"]
TREE = TreeConfig(depth=3, top_k=3, total_tokens=8, mode="tree")
CHAIN = TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain")
MAX_NEW = 24
pytestmark = pytest.mark.slow  # each test compiles speculative decoding or the VSD step: 25-45 s on 2 cores


def _prompts():
  rng = np.random.RandomState(0)
  lens = np.array([3, 7, 5], np.int32)
  prompts = np.zeros((3, 7), np.int32)
  for i, n in enumerate(lens):
    prompts[i, :n] = rng.randint(0, 8, n)
  return jnp.asarray(prompts), jnp.asarray(lens)


def _greedy_equals_vanilla(model, params, draft, draft_params, d2t, shapes):
  prompts, lens = _prompts()
  ref = generate(model, params, prompts, lens, jax.random.PRNGKey(0), 0.0, max_new_tokens=MAX_NEW, cache_slots=64)
  outs = []
  for shape in shapes:
    out = speculative_generate(model, params, draft, draft_params, d2t, prompts, lens, jax.random.PRNGKey(0),
                               tree_cfg=shape, max_new_tokens=MAX_NEW,
                               cache_slots=required_slots(prompts.shape[1], MAX_NEW, shape))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=shape.mode)
    np.testing.assert_array_equal(np.asarray(out.num_new), np.asarray(ref.num_new))
    outs.append(out)
  return outs


def _random_draft(arch):
  """-> (tiny target model, params, draft module, random draft params, d2t, t2d): a draft over ids 2..7 of 8."""
  model, params = tiny_target(arch=arch)
  dcfg = Eagle3Config.from_target(model.cfg, draft_vocab_size=6)
  d2t, t2d = vocab_maps(8, range(2, 8))
  dp = init_draft_params(dcfg, jax.random.PRNGKey(1), params["embed_tokens"]["embedding"])
  return model, params, Eagle3Draft(dcfg), dp, d2t, t2d


@pytest.mark.parametrize("arch", ARCHS)
def test_qwen_mistral_speculative_greedy_equals_vanilla_random_draft(arch):
  """T=0 tree decoding with a random draft equals vanilla decoding; sequences run past Mistral's window (6)."""
  model, params, draft, dp, d2t, _ = _random_draft(arch)
  _greedy_equals_vanilla(model, params, draft, dp, d2t, [TREE])


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_qwen_mistral_trained_draft_is_accepted_and_lossless(arch):
  """EAGLE-3 training on the architecture's tiny target (tiny_setup, 60 steps) gives a draft the target accepts
  (tau > 1.5), and T=0 tree and chain decoding with it equal vanilla decoding. Qwen3 (q/k norms) and Mistral (the
  window) only: Qwen2 differs from the LLaMA path by its q/k/v biases, which the random-draft test and the VSD step
  cover (its own case would cost about 35 s of the full suite)."""
  model, params, draft, trained, _, d2t, _ = tiny_setup(arch=arch, train_steps=60)
  tree, _ = _greedy_equals_vanilla(model, params, draft, trained, d2t, [TREE, CHAIN])
  tau = float(tree.num_new.sum() / tree.rounds.sum())
  assert tau > 1.5, f"{arch}: the trained draft should be accepted (tau {tau})"


@pytest.mark.parametrize("arch", ARCHS)
def test_qwen_mistral_vsd_step(arch):
  """One VSD loss and gradient on the architecture's tiny target: finite, reaching the draft, not the target."""
  from vsd_jax.config_base import base_config
  from vsd_jax.methods.vsd import build as build_vsd
  model, params, _, dp, d2t, t2d = _random_draft(arch)
  c = base_config()
  c.draft.ttt_steps = 2
  c.vsd.update(dict(depth=3, num_paths=2, num_anchors=3, burn_in=1))
  target = types.SimpleNamespace(model=model, params=params, config=model.cfg)
  method = build_vsd(c, target, types.SimpleNamespace(d2t=np.asarray(d2t), t2d=np.asarray(t2d)))
  rng = np.random.default_rng(0)
  t = 12
  valid = jnp.asarray(np.arange(t)[None, :] < np.array([[t], [t - 3]]))
  ids = jnp.asarray(rng.integers(0, 8, (2, t)), jnp.int32) * valid
  batch = dict(input_ids=ids, attention_mask=valid, loss_mask=valid & (jnp.arange(t)[None, :] >= 3))

  def loss(p, tp):
    return method.loss_fn(p, dict(method.frozen, target=tp), batch, jax.random.PRNGKey(0), method.method_state)

  (value, (metrics, _)), (g_draft, g_target) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      dp, method.frozen["target"])
  assert np.isfinite(float(value)) and float(metrics["anchors"]) > 0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_target)
             if jnp.issubdtype(g.dtype, jnp.floating))
  assert float(jnp.linalg.norm(g_draft["fc"]["kernel"])) > 0

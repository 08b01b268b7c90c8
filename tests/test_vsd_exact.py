"""VSD's exact objective on the teacher-forced chain (vsd_jax/methods/vsd/exact.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import tiny_setup
from vsd_jax.decoding.vanilla import generate
from vsd_jax.methods.eagle3.loss import TTTRows, eagle3_loss
from vsd_jax.methods.vsd.exact import exact_terms, reach_weighted_ce
from vsd_jax.methods.vsd.paths import sample_draft_paths
from vsd_jax.models.features import target_features


def _rows(logq, greedy, exists, overlap=None, ce=None):
  f = lambda x: jnp.asarray(x, jnp.float32)
  logq = f(logq)
  return TTTRows(ce=f(ce if ce is not None else np.ones(logq.shape)), ce_counted=f(exists), logq_data=logq,
                 greedy=f(greedy), overlap=f(overlap if overlap is not None else np.full(logq.shape, 0.5)),
                 exists=f(exists))


def test_exact_terms_by_hand():
  # [K=3, B=1, T=4] rows: (a) all greedy; (b) cut at step 2; (c) first step not greedy (unsupported);
  # (d) only one step exists (end of the response).
  q = np.array([[0.5, 0.8, 0.3, 0.9], [0.4, 0.5, 0.6, 0.7], [0.2, 0.9, 0.5, 0.6]])
  greedy = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]])
  exists = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
  rows = _rows(np.log(q)[:, None], greedy[:, None], exists[:, None])
  t = exact_terms(rows, "greedy")
  eu = [0.5 + 0.5 * 0.4 + 0.5 * 0.4 * 0.2, 0.8, 0.0, 0.9]
  np.testing.assert_allclose(np.asarray(t.expected_u)[0], eu, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(t.supported)[0], [1, 1, 0, 1])
  np.testing.assert_allclose(float(t.neg_j), -np.mean(np.log([eu[0], eu[1], eu[3]])), rtol=1e-6)
  # reach_k = prod_{j<k} a_j
  np.testing.assert_allclose(np.asarray(t.reach)[:, 0, 0], [1, 0.5, 0.2], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(t.reach)[:, 0, 1], [1, 0.8, 0], atol=1e-7)
  # stochastic: a_k = overlap, cut where a step does not exist
  ov = np.array([[0.5, 0.2, 0.0, 0.9], [0.5, 0.5, 0.6, 0.7], [0.5, 0.1, 0.5, 0.6]])
  ts = exact_terms(_rows(np.log(q)[:, None], greedy[:, None], exists[:, None], overlap=ov[:, None]), "stochastic")
  np.testing.assert_allclose(np.asarray(ts.expected_u)[0], [0.5 + 0.25 + 0.125, 0.2 + 0.1 + 0.01, 0.0, 0.9],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="accept_mode"):
    exact_terms(rows, "sampled")


def test_exact_gradient_is_the_em_posterior_weights():
  """-d J / d log q_j(y_j) = w_j = sum_{k>=j} P_k / sum_k P_k: the exact EM M-step gradient (VSD_METHOD.md 3)."""
  rng = np.random.default_rng(0)
  q = rng.uniform(0.05, 0.95, (4, 2, 3))
  greedy = (rng.uniform(size=(4, 2, 3)) < 0.8).astype(np.float32)
  greedy[0] = 1
  exists = np.ones((4, 2, 3))
  g = jax.grad(lambda lq: exact_terms(_rows(lq, greedy, exists), "greedy").neg_j)(jnp.log(jnp.asarray(q)))
  ok = np.cumprod(greedy, axis=0)
  p = np.cumprod(q, axis=0) * ok                                 # P_k
  w = np.cumsum(p[::-1], axis=0)[::-1] / p.sum(axis=0)           # sum_{k>=j} P_k / sum P
  np.testing.assert_allclose(-np.asarray(g), w * ok / 6, rtol=1e-5, atol=1e-7)


def test_reach_weighted_ce_by_hand():
  ce = np.array([[1.0, 2.0], [3.0, 5.0]])[:, None]               # [K=2, B=1, T=2]
  rows = _rows(np.zeros((2, 1, 2)), np.ones((2, 1, 2)), np.ones((2, 1, 2)), ce=ce)
  reach = jnp.asarray(np.array([[1.0, 1.0], [0.75, 0.25]])[:, None])
  got = float(reach_weighted_ce(rows, reach, decay=0.5))
  np.testing.assert_allclose(got, 1.5 + 0.5 * (0.75 * 3 + 0.25 * 5) / 1.0, rtol=1e-6)


@pytest.mark.slow
def test_exact_expected_utility_equals_sampled_draft_paths():
  """E_q[U] from the teacher-forced rows equals the mean utility of paths sampled from the draft (the VSD
  E-step's proposals), on a sequence whose response is the target's greedy output (T = 0 acceptance)."""
  model, params, draft, trained, _, d2t, t2d = tiny_setup()
  k, t_prompt, n_new = 4, 4, 12
  prompt = jnp.asarray([[3, 1, 6, 2]], jnp.int32)
  out = generate(model, params, prompt, jnp.full((1,), t_prompt, jnp.int32), jax.random.PRNGKey(0), 0.0,
                 max_new_tokens=n_new, cache_slots=32)
  ids = jnp.concatenate([prompt, out.tokens], axis=1)
  valid = jnp.ones(ids.shape, bool)
  loss_mask = jnp.arange(ids.shape[1])[None] >= t_prompt
  feats, logits = target_features(model, params, ids, valid)
  embed = params["embed_tokens"]["embedding"]
  _, eagle3_metrics = eagle3_loss(trained, draft, embed, feats, ids, logits, loss_mask, t2d, d2t, num_steps=k,
                                  attention_mask=valid, with_rows=True)
  terms = exact_terms(eagle3_metrics["rows"], "greedy")
  anchors = np.array([4, 6, 9])                                   # anchor t <-> TTT row t - 1
  n, per_call = 4000, 250
  sample = jax.jit(lambda key: sample_draft_paths(trained, draft, embed, feats, ids, valid, jnp.asarray(anchors)[None],
                                                  d2t, key, num_paths=per_call, depth=k, temperature=1.0).tokens[0])
  tokens = np.concatenate([np.asarray(sample(jax.random.PRNGKey(i))) for i in range(n // per_call)], axis=1)
  y = np.stack([np.asarray(ids[0, a + 1:a + 1 + k]) for a in anchors])          # [M, K] the greedy data
  hit = tokens == y[:, None, :]                                                 # [M, S, K]
  u = np.cumprod(hit, axis=-1).sum(-1)
  exact = np.asarray(terms.expected_u)[0, anchors - 1]
  assert np.all(np.asarray(eagle3_metrics["rows"].greedy)[:, 0, anchors - 1] == 1)  # the data is the greedy path
  assert exact.min() > 0.05, exact                                              # a test with signal
  np.testing.assert_array_less(np.abs(u.mean(-1) - exact), 4 * u.std(-1) / np.sqrt(n) + 1e-3)


def test_hold_share_gradient():
  """hold_share: same losses; gradient g_a + c g_x with |g_a| / (|g_a| + c |g_x|) = share, against jax.grad of each
  term; c = 0 when the extra term has no gradient."""
  import optax
  from vsd_jax.methods.grad_share import hold_share
  data = jnp.array([1.0, 2.0, 3.0])
  params = {"w": jnp.array([0.3, -1.0, 2.0]), "b": jnp.array([[0.5, 1.5, -2.0]])}
  anchor = lambda p: jnp.sum((p["w"] * data - 1.0) ** 2)                    # noqa: E731
  extra = lambda p, s: s * jnp.sum(jnp.sin(p["w"]) * p["b"] ** 2)          # noqa: E731
  for share, scale in ((0.25, 1.0), (0.6, 1.0), (0.25, 0.0)):
    def loss(p):
      (a, x), aux = hold_share(lambda q: ((anchor(q), extra(q, scale)), {"a": anchor(q)}), p, share)
      return a + x, aux
    (value, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(value, anchor(params) + extra(params, scale), rtol=1e-6)
    ga, gx = jax.grad(anchor)(params), jax.grad(lambda p: extra(p, scale))(params)
    na, nx = float(optax.global_norm(ga)), float(optax.global_norm(gx))
    c = (1 - share) / share * na / nx if nx > 0 else 0.0
    for k in params:
      np.testing.assert_allclose(g[k], ga[k] + c * gx[k], rtol=1e-5, atol=1e-6)
    if nx > 0:
      np.testing.assert_allclose(na / (na + c * nx), share, rtol=1e-6)
  with pytest.raises(ValueError, match="share=1.5"):
    hold_share(lambda q: ((anchor(q), anchor(q)), {}), params, 1.5)


@pytest.mark.slow  # 70 s on 2 cores: the fast tier stays under 5 minutes
def test_exact_loss_with_eagle3_grad_share():
  """vsd.estep='exact' with eagle3_grad_share: the loss is unchanged and its gradient is g_EAGLE-3 + c g_(-J) with the
  EAGLE-3 term holding that share of the norm (g_EAGLE-3 from lambda_exact = 0, g_(-J) = the plain total's minus it)."""
  import optax
  import types
  from tests.tiny_models import tiny_target, vocab_maps  # noqa: F401
  from vsd_jax.config_base import base_config
  from vsd_jax.methods.vsd import build as build_vsd
  model, params, draft, trained, _, d2t, t2d = tiny_setup()
  target = types.SimpleNamespace(model=model, params=params, config=model.cfg)
  vocab = types.SimpleNamespace(d2t=np.asarray(d2t), t2d=np.asarray(t2d))
  prompt = jnp.asarray([[3, 1, 6, 2]], jnp.int32)
  out = generate(model, params, prompt, jnp.full((1,), 4, jnp.int32), jax.random.PRNGKey(0), 0.0,
                 max_new_tokens=12, cache_slots=32)
  ids = jnp.concatenate([prompt, out.tokens], axis=1)
  batch = dict(input_ids=ids, attention_mask=jnp.ones(ids.shape, jnp.int32),
               loss_mask=(jnp.arange(ids.shape[1]) >= 4)[None].astype(jnp.int32))

  def grads(**vsd):
    c = base_config()
    c.draft.ttt_steps = 3
    c.vsd.update(dict(estep="exact", depth=3, **vsd))
    method = build_vsd(c, target, vocab)
    f = lambda p: method.loss_fn(p, method.frozen, batch, jax.random.PRNGKey(0), method.method_state)  # noqa: E731
    (loss, _), g = jax.jit(jax.value_and_grad(f, has_aux=True))(trained)
    return float(loss), g

  plain_loss, g_plain = grads()
  _, g_e3 = grads(lambda_exact=0.0)
  g_j = jax.tree.map(lambda a, b: a - b, g_plain, g_e3)
  na, nj = float(optax.global_norm(g_e3)), float(optax.global_norm(g_j))
  assert nj > 1e-3 * na  # -J has a gradient of its own here (otherwise the check below is vacuous)
  share_loss, g_share = grads(eagle3_grad_share=0.8)
  np.testing.assert_allclose(share_loss, plain_loss, rtol=1e-6)
  c = 0.2 / 0.8 * na / nj
  expect = jax.tree.map(lambda a, b: a + c * b, g_e3, g_j)
  for a, b in zip(jax.tree.leaves(g_share), jax.tree.leaves(expect)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)
  with pytest.raises(ValueError, match="eagle3_grad_share"):
    grads(eagle3_grad_share=0.5, exact_form="reach")

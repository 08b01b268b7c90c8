"""VSD pieces against their definitions (VSD_METHOD.md): E-step chain, acceptance/utility, oracle, path
sampling vs the decode-time unroll, gradients, the whole loss, exact EM on an enumerable toy."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tiny_models import init_draft_params, tiny_setup, tiny_target, vocab_maps
from vsd_jax.config_base import base_config
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft, init_draft_cache
from vsd_jax.methods.vsd import estep as vsd_estep, mstep as vsd_mstep, utility as vsd_utility
from vsd_jax.models.features import target_features, target_pass
from vsd_jax.methods.vsd import build as build_vsd
from vsd_jax.methods.vsd.oracle import oracle_outputs, oracle_slots, reduce_logits
from vsd_jax.methods.vsd.paths import choose_anchors, sample_draft_paths, score_draft_paths
from vsd_jax.resolved import resolve


# ---------------------------------------------------------------- E-step
def test_mh_chain_matches_oracle_filtered_posterior():
  """Independence MH over proposals from q has stationary law q*U/Z (exact enumeration, TV <= 0.02)."""
  q = np.array([0.30, 0.25, 0.2, 0.15, 0.07, 0.03])
  util = np.array([0.0, 1.0, 3.0, 0.5, 2.0, 6.0])
  target = q * util / np.sum(q * util)
  s = 200_000
  draws = jax.random.choice(jax.random.PRNGKey(0), 6, (1, s), p=jnp.asarray(q))
  u = jnp.asarray(util, jnp.float32)[draws]
  est = vsd_estep.mcmc_weights(u, jax.random.PRNGKey(1), burn_in=100)
  hist = np.bincount(np.asarray(draws[0]), weights=np.asarray(est.weights[0]), minlength=6)
  tv = 0.5 * np.abs(hist - target).sum()
  assert tv <= 0.02, (hist, target)
  # The zero-utility outcome is filtered out entirely; snis weights are consistent too.
  assert hist[0] == 0
  sn = vsd_estep.snis_weights(u)
  tv_snis = 0.5 * np.abs(np.bincount(np.asarray(draws[0]), weights=np.asarray(sn.weights[0]), minlength=6)
                         - target).sum()
  assert tv_snis <= 0.02
  # Stationary acceptance rate of the independence chain: sum_x pi(x) sum_y q(y) min(1, U(y) / U(x)).
  rate = sum(target[x] * q[y] * min(1.0, util[y] / util[x]) for x in range(6) if util[x] > 0 for y in range(6))
  assert abs(float(est.accept_rate[0]) - rate) < 0.01, (float(est.accept_rate[0]), rate)


def test_mh_chain_small_cases_by_hand():
  u = jnp.array([[0.0, 0.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
  states, moves = vsd_estep.mh_chain_states(u, jax.random.PRNGKey(0))
  # Row 0 starts at proposal 2 (first U > 0) and must move to 3 (ratio 4/2 >= 1).
  np.testing.assert_array_equal(np.asarray(states[:, 0]), [2, 2, 2, 3])
  est = vsd_estep.mcmc_weights(u, jax.random.PRNGKey(0), burn_in=2)
  np.testing.assert_allclose(np.asarray(est.weights), [[0, 0, 0.5, 0.5], [0, 0, 0, 0]])
  assert list(np.asarray(est.supported)) == [True, False]
  with pytest.raises(ValueError, match="burn_in"):
    vsd_estep.mcmc_weights(u, jax.random.PRNGKey(0), burn_in=4)
  # ELBO of snis weights = log mean U; of any other weights, lower.
  sn = vsd_estep.snis_weights(u[:1])
  np.testing.assert_allclose(float(vsd_estep.elbo_estimate(u[:1], sn.weights)[0]), np.log(6.0 / 4), rtol=1e-6)
  assert float(vsd_estep.elbo_estimate(u[:1], est.weights[:1])[0]) < np.log(6.0 / 4)


# ---------------------------------------------------------------- acceptance and utility
def test_acceptance_and_utility_by_hand():
  logits = jnp.log(jnp.array([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]]]))  # [1, K=3, V=3]
  z = jnp.array([[1, 2, 2]])
  q = jnp.array([[0.5, 0.6, 0.3]])
  p = reduce_logits(logits, z)  # what the oracle hands the E-step
  a_g = vsd_utility.acceptance("greedy", z, q, p.argmax, p.token_prob)
  np.testing.assert_array_equal(np.asarray(a_g), [[1, 0, 1]])
  assert float(vsd_utility.expected_length(a_g)[0]) == 1.0
  assert float(vsd_utility.full_acceptance(a_g)[0]) == 0.0
  a_s = vsd_utility.acceptance("stochastic", z, q, p.argmax, p.token_prob)
  np.testing.assert_allclose(np.asarray(a_s), [[1.0, 0.5, 1.0]], rtol=1e-6)
  # U = 1 + 0.5 + 0.5 = 2.0; kappa = 0.5
  np.testing.assert_allclose(float(vsd_utility.expected_length(a_s)[0]), 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(vsd_utility.full_acceptance(a_s)[0]), 0.5, rtol=1e-6)
  # Temperature 0.5 sharpens p: p^T(z) = softmax(log p / 0.5)
  p_t = np.array([0.5, 0.2, 0.3]) ** 2 / np.sum(np.array([0.5, 0.2, 0.3]) ** 2)
  p_half = reduce_logits(logits, z, 0.5)
  a_t = vsd_utility.acceptance("stochastic", z, q, p_half.argmax, p_half.token_prob)
  np.testing.assert_allclose(float(a_t[0, 1]), min(1.0, p_t[2] / 0.6), rtol=1e-5)
  with pytest.raises(ValueError, match="acceptance mode"):
    vsd_utility.acceptance("sampled", z, q, p.argmax, p.token_prob)
  # Realised length with shared uniforms.
  a = jnp.array([[1.0, 0.5, 1.0, 0.2]])
  assert int(vsd_utility.accepted_length(a, jnp.array([[0.3, 0.4, 0.9, 0.1]]))[0]) == 4
  assert int(vsd_utility.accepted_length(a, jnp.array([[0.3, 0.6, 0.0, 0.1]]))[0]) == 1
  c, reach = vsd_utility.depth_acceptance(jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), jnp.ones((3,)))
  np.testing.assert_allclose(np.asarray(c), [2 / 3, 1 / 2])
  np.testing.assert_allclose(np.asarray(reach), [3, 2])


def test_arw_weights_by_hand():
  a = jnp.array([[1.0, 1.0, 0.0, 1.0, 1.0]])
  eta_k = jnp.array([0.1, 0.2, 0.3, 0.4, 0.5])
  like, unlike = vsd_mstep.arw_token_weights(jnp.array([2]), a, eta_k, rho0=0.5, rho=0.5, gamma=1.0)
  np.testing.assert_allclose(np.asarray(like), [[1, 1, 0, 0.5 * 0.5, 0.5 * 0.25]])
  np.testing.assert_allclose(np.asarray(unlike), [[0, 0, 0.3, 0, 0]])
  like, unlike = vsd_mstep.arw_token_weights(jnp.array([2]), a, eta_k, gamma=0.5)
  np.testing.assert_allclose(np.asarray(like), [[1, 0.5, 0, 0, 0]])
  np.testing.assert_allclose(np.asarray(unlike), [[0, 0, 0.3 * 0.25, 0, 0]])
  # eta_k = eta * clip(c / (1 - c), 0, eta_max)
  np.testing.assert_allclose(np.asarray(vsd_mstep.rejection_strength(jnp.array([0.5, 0.2, 0.99]), 0.5, 4.0)),
                             [0.5, 0.5 * 0.25, 2.0], rtol=1e-5)


def test_arw_loss_with_unlikelihood_by_hand():
  """ARW's loss on a weighted sample with a nonzero unlikelihood weight: per path, -log q(z_k) for k <= L and
  eta_k (1 - a_k) * -log(1 - q(z_{L+1})) at the first rejection, summed with the E-step weights / #anchors."""
  q = np.array([[[0.5, 0.2, 0.9, 0.3], [0.3, 0.6, 0.1, 0.8]],
                [[0.4, 0.4, 0.4, 0.4], [0.7, 0.1, 0.2, 0.5]]])                  # q(z_k) [A=2, S=2, K=4]
  a = np.array([[[1.0, 1.0, 0.2, 1.0], [1.0, 0.4, 1.0, 1.0]],
                [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]])
  ell = np.array([[2, 1], [4, 0]])                                               # realised L
  w = np.array([[0.25, 0.75], [0.0, 0.0]])                                       # anchor 1 unsupported
  eta_k = np.array([0.5, 1.0, 1.5, 2.0])
  like, unlike = vsd_mstep.arw_token_weights(jnp.asarray(ell), jnp.asarray(a, jnp.float32), jnp.asarray(eta_k))
  got = vsd_mstep.weighted_path_loss(jnp.log(jnp.asarray(q, jnp.float32)), like, unlike, jnp.asarray(w, jnp.float32))
  # Anchor 0: path 0 accepts 2 then rejects z_3 (a = 0.2); path 1 accepts 1 then rejects z_2 (a = 0.4).
  path0 = -np.log(0.5) - np.log(0.2) + 1.5 * (1 - 0.2) * -np.log(1 - 0.9)
  path1 = -np.log(0.3) + 1.0 * (1 - 0.4) * -np.log(1 - 0.6)
  np.testing.assert_allclose(float(got), 0.25 * path0 + 0.75 * path1, rtol=1e-5)  # one anchor counts
  # The term pushes q(z_{L+1}) down: its gradient in log q is + eta (1 - a) q / (1 - q) > 0.
  g = jax.grad(lambda lq: vsd_mstep.weighted_path_loss(lq, like, unlike, jnp.asarray(w, jnp.float32)))(
      jnp.log(jnp.asarray(q, jnp.float32)))
  np.testing.assert_allclose(float(g[0, 0, 2]), 0.25 * 1.5 * 0.8 * 0.9 / 0.1, rtol=1e-4)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_car_loss_by_hand():
  """CAR = sum_k visited_k c(p_k) KL(p_k || q_k) / sum_k visited_k with p_k the target restricted to the draft
  vocabulary and renormalised, c(p) = (max_v p(v))^beta over the full vocabulary; KL in that direction."""
  rng = np.random.default_rng(0)
  k, v, beta = 3, 7, 2.0
  ids = np.array([1, 2, 4, 6])                                                   # draft vocabulary (target ids)
  tl, dl = 2.0 * rng.normal(size=(k, v)), rng.normal(size=(k, len(ids)))
  visited = np.array([1.0, 0.0, 1.0])
  p, q = _softmax(tl[:, ids]), _softmax(dl)
  conf = _softmax(tl).max(-1) ** beta
  want = np.sum(visited * conf * np.sum(p * np.log(p / q), -1)) / visited.sum()
  flipped = np.sum(visited * conf * np.sum(q * np.log(q / p), -1)) / visited.sum()
  assert abs(flipped - want) > 0.05 * want  # the example tells KL(p || q) from KL(q || p)
  out = reduce_logits(jnp.asarray(tl, jnp.float32), jnp.zeros((k,), jnp.int32), draft_ids=jnp.asarray(ids))
  car = lambda d: vsd_mstep.car_loss(d, out.draft_logits, out.top_logp, jnp.asarray(visited), beta)
  np.testing.assert_allclose(float(car(jnp.asarray(dl, jnp.float32))), want, rtol=1e-5)
  # d/d draft logits of KL(p || q) = q - p (the flipped direction's gradient is not).
  g = jax.grad(car)(jnp.asarray(dl, jnp.float32))
  np.testing.assert_allclose(np.asarray(g), (visited * conf)[:, None] * (q - p) / visited.sum(), atol=1e-6)


def test_reduce_logits_against_log_softmax():
  """The oracle's reduction gives log_softmax's numbers: p^T(z), argmax, max log p, the draft-vocabulary slice."""
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 50))
  z = jax.random.randint(jax.random.PRNGKey(1), (2, 3, 4), 0, 50)
  ids = jnp.array([0, 3, 7, 20, 49])
  for temp in (1.0, 0.7):
    out = reduce_logits(x, z, temp, ids)
    logp_t = jax.nn.log_softmax(x / temp, axis=-1)
    np.testing.assert_allclose(np.asarray(out.token_prob),
                               np.exp(np.take_along_axis(np.asarray(logp_t), np.asarray(z)[..., None], -1)[..., 0]),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.argmax), np.argmax(np.asarray(x), -1))
    np.testing.assert_allclose(np.asarray(out.top_logp), np.max(np.asarray(jax.nn.log_softmax(x, -1)), -1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.draft_logits), np.asarray(x)[..., np.asarray(ids)])
  assert reduce_logits(x, z).draft_logits is None
  with pytest.raises(ValueError, match="temperature"):
    reduce_logits(x, z, 0.0)


def test_dry_run_oracle_memory():
  """--dry_run's oracle figure: the full logits B*M*S*K*V*4 bytes against the reduced outputs, 4 bytes each of
  token_prob, argmax, top_logp plus N draft-vocabulary logits per path token (N = 0 with CAR off)."""
  from vsd_jax.dry_run import GIB, vsd_oracle_memory

  c = base_config()
  c.data.draft_vocab_size = 32000
  b, v = 16, 128256
  tokens = b * c.vsd.num_anchors * c.vsd.num_paths * c.vsd.depth
  got = vsd_oracle_memory(c, v, b, 2)
  np.testing.assert_allclose(got["full_logits"]["whole"], tokens * v * 4 / GIB)
  np.testing.assert_allclose(got["reduced"]["whole"], tokens * (12 + 4 * 32000) / GIB)
  np.testing.assert_allclose(got["reduced"]["per_device"], got["reduced"]["whole"] / 8)
  c.vsd.lambda_car = 0.0
  np.testing.assert_allclose(vsd_oracle_memory(c, v, b, 2)["reduced"]["whole"], tokens * 12 / GIB)


@pytest.mark.slow  # 17 s on 2 cores: the fast tier stays under 5 minutes
def test_oracle_and_paths_ignore_the_padding_side():
  """One sequence gives the same oracle outputs and draft paths unpadded, right-padded and LEFT-padded: RoPE
  positions come from the valid mask (anchor t's node z_k at pos(t) + k), and padding slots are never attended.
  (With slot-index positions the left-padded p_k would differ.)"""
  model, params = tiny_target()
  embed = params["embed_tokens"]["embedding"]
  d2t, _ = vocab_maps(8, range(2, 8))
  dcfg = Eagle3Config.from_target(model.cfg, draft_vocab_size=6)
  draft, dparams = Eagle3Draft(dcfg), init_draft_params(dcfg, jax.random.PRNGKey(1), embed)
  n, pad, m, s, k = 9, 3, 2, 3, 3
  seq = jax.random.randint(jax.random.PRNGKey(2), (1, n), 0, 8)
  draft_ids = jax.random.randint(jax.random.PRNGKey(3), (1, m, s, k), 0, 6)
  tokens = draft_ids + d2t[draft_ids]
  anchors = jnp.array([[2, 7]], jnp.int32)
  zeros, ones = jnp.zeros((1, pad), jnp.int32), jnp.ones((1, n), bool)
  layouts = dict(unpadded=(seq, ones, 0),
                 right=(jnp.concatenate([seq, zeros], 1), jnp.concatenate([ones, zeros.astype(bool)], 1), 0),
                 left=(jnp.concatenate([zeros, seq], 1), jnp.concatenate([zeros.astype(bool), ones], 1), pad))
  got = {}
  for name, (ids, valid, shift) in layouts.items():
    t = ids.shape[1]
    tp = target_pass(model, params, ids, valid, cache_slots=oracle_slots(t, m, s, k))
    out = oracle_outputs(model, params, tp.kv_cache, t, tp.logits, valid, anchors + shift, tokens, temperature=0.7,
                         draft_ids=jnp.arange(8))  # the draft-vocabulary slice = the full logits here
    paths = score_draft_paths(dparams, draft, embed, tp.features, ids, valid, anchors + shift, d2t, draft_ids)
    got[name] = (out, paths.logq)
  want, want_logq = got["unpadded"]
  assert want.draft_logits.shape == (1, m, s, k, 8)
  assert jax.eval_shape(lambda: want) == jax.eval_shape(  # the shapes --dry_run reports (vsd_oracle_memory)
      lambda: reduce_logits(jnp.zeros((1, m, s, k, 8)), tokens, 0.7, jnp.arange(8)))
  for name in ("right", "left"):
    out, logq = got[name]
    np.testing.assert_allclose(np.asarray(out.draft_logits), np.asarray(want.draft_logits), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(np.asarray(out.token_prob), np.asarray(want.token_prob), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(out.top_logp), np.asarray(want.top_logp), atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(out.argmax), np.asarray(want.argmax), err_msg=name)
    np.testing.assert_allclose(np.asarray(logq), np.asarray(want_logq), atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- oracle and paths on a tiny target
B, T, M, S, K = 2, 12, 3, 2, 4


@pytest.fixture(scope="module")
def tiny():  # tiny_setup() trains a draft (~50 s): the tests that use it are marked slow
  model, params, draft, trained, _, d2t, t2d = tiny_setup()
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 8, (B, T)), jnp.int32)
  valid = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [T - 3]]))
  ids = ids * valid
  loss_mask = valid & (jnp.arange(T)[None, :] >= 3)
  return types.SimpleNamespace(model=model, params=params, draft=draft, dparams=trained, d2t=d2t, t2d=t2d,
                               ids=ids, valid=valid, loss_mask=loss_mask)


def _paths(tiny, anchors, rng=0):
  tp = target_pass(tiny.model, tiny.params, tiny.ids, tiny.valid, cache_slots=oracle_slots(T, M, S, K))
  embed = tiny.params["embed_tokens"]["embedding"]
  paths = sample_draft_paths(tiny.dparams, tiny.draft, embed, tp.features, tiny.ids, tiny.valid, anchors, tiny.d2t,
                             jax.random.PRNGKey(rng), num_paths=S, depth=K, temperature=1.0)
  return tp, embed, paths


@pytest.mark.slow
def test_oracle_equals_plain_target_forward(tiny):
  anchors = jnp.array([[2, 5, 11], [1, 4, 8]], jnp.int32)
  tp, _, paths = _paths(tiny, anchors)
  # The cached pass gives the features/logits of the plain pass.
  f_plain, l_plain = target_features(tiny.model, tiny.params, tiny.ids, tiny.valid)
  np.testing.assert_allclose(np.asarray(tp.logits)[0], np.asarray(l_plain)[0], atol=1e-5)
  p = oracle_outputs(tiny.model, tiny.params, tp.kv_cache, T, tp.logits, tiny.valid, anchors, paths.tokens,
                     draft_ids=jnp.arange(8))  # the "draft-vocabulary" slice of all 8 ids: the full logits
  assert p.draft_logits.shape == (B, M, S, K, 8)
  worst = 0.0
  for b in range(B):
    for m in range(M):
      t = int(anchors[b, m])
      for s in range(S):
        seq = jnp.concatenate([tiny.ids[b, :t + 1], paths.tokens[b, m, s, :K - 1]])[None]
        ref = tiny.model.apply({"params": tiny.params}, seq).logits[0, t:t + K]
        worst = max(worst, float(jnp.max(jnp.abs(ref - p.draft_logits[b, m, s]))))
        want = reduce_logits(ref, paths.tokens[b, m, s])
        np.testing.assert_array_equal(np.asarray(p.argmax[b, m, s]), np.asarray(want.argmax))
        np.testing.assert_allclose(np.asarray(p.token_prob[b, m, s]), np.asarray(want.token_prob), atol=1e-5)
        np.testing.assert_allclose(np.asarray(p.top_logp[b, m, s]), np.asarray(want.top_logp), atol=1e-5)
  assert worst <= 1e-5, worst


@pytest.mark.slow
def test_sampled_paths_equal_decode_time_unroll_and_rescoring(tiny):
  anchors = jnp.array([[3, 6, 9], [2, 5, 7]], jnp.int32)
  tp, embed, paths = _paths(tiny, anchors, rng=3)
  scored = score_draft_paths(tiny.dparams, tiny.draft, embed, tp.features, tiny.ids, tiny.valid, anchors,
                             tiny.d2t, paths.draft_ids)
  np.testing.assert_allclose(np.asarray(scored.logq), np.asarray(paths.logq), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(paths.tokens), np.asarray(paths.draft_ids + tiny.d2t[paths.draft_ids]))
  # Reference: the decode-time chain, one cached draft call per token (as speculative decoding runs it).
  cfg = tiny.draft.cfg
  for b, m, s in [(0, 0, 0), (0, 2, 1), (1, 1, 0), (1, 2, 1)]:
    t = int(anchors[b, m])
    cache = init_draft_cache(cfg, 1, 32)
    out = tiny.draft.apply({"params": tiny.dparams}, embed, tiny.ids[b:b + 1, 1:t + 1], tp.features[b:b + 1, :t],
                           kv_cache=cache, write_index=jnp.zeros((1,), jnp.int32))
    logits, hidden, cache = out.logits[:, -1], out.hidden[:, -1:], out.kv_cache
    for k in range(K):
      ref = jax.nn.log_softmax(logits[0])[paths.draft_ids[b, m, s, k]]
      np.testing.assert_allclose(float(ref), float(paths.logq[b, m, s, k]), atol=1e-5)
      out = tiny.draft.apply({"params": tiny.dparams}, embed, paths.tokens[b:b + 1, m, s, k:k + 1], hidden,
                             kv_cache=cache, write_index=jnp.full((1,), t + k, jnp.int32))
      logits, hidden, cache = out.logits[:, -1], out.hidden, out.kv_cache


@pytest.mark.slow
def test_sampled_paths_follow_q():
  """z_1 samples are draws from q_1: chi-square-free check by frequency on many paths of one anchor."""
  model, params, draft, trained, _, d2t, _ = tiny_setup()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 8, (1, 10)), jnp.int32)
  valid = jnp.ones((1, 10), bool)
  feats, _ = target_features(model, params, ids, valid)
  embed = params["embed_tokens"]["embedding"]
  n = 4000
  paths = sample_draft_paths(trained, draft, embed, feats, ids, valid, jnp.array([[5]]), d2t, jax.random.PRNGKey(7),
                             num_paths=n, depth=1, temperature=1.0)
  q1 = np.exp(np.asarray(paths.logits[0, 0, 0, 0]) - np.max(np.asarray(paths.logits[0, 0, 0, 0])))
  q1 /= q1.sum()
  freq = np.bincount(np.asarray(paths.draft_ids[0, 0, :, 0]), minlength=q1.size) / n
  assert np.max(np.abs(freq - q1)) < 4 * np.sqrt(0.25 / n)


def test_anchor_choice_respects_masks():
  loss_mask = jnp.array([[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], bool)
  valid = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], bool)
  anchors, ok = choose_anchors(loss_mask, valid, 4, jax.random.PRNGKey(0))
  a, o = np.asarray(anchors), np.asarray(ok)
  assert sorted(a[0][o[0]]) == [2, 3, 4] and o[0].sum() == 3   # next token is a response token
  assert sorted(a[1][o[1]]) == [1] and o[1].sum() == 1          # t >= 1


# ---------------------------------------------------------------- the whole loss
def _vsd_config(**vsd):
  c = base_config()
  c.draft.ttt_steps = 2
  c.vsd.update(dict(depth=K, num_paths=S, num_anchors=M, burn_in=1))
  c.vsd.update(vsd)
  return c


@pytest.mark.slow
def test_vsd_gradients_reach_draft_parameters_only(tiny, monkeypatch):
  target = types.SimpleNamespace(model=tiny.model, params=tiny.params, config=tiny.model.cfg)
  vocab = types.SimpleNamespace(d2t=np.asarray(tiny.d2t), t2d=np.asarray(tiny.t2d))
  estep_in = []  # the E-step's utilities U [A, S] and weights w [A, S], for the monitors' definitions below
  estep_weights = vsd_estep.estep_weights
  def spy(u, rng, *args):
    est = estep_weights(u, rng, *args)
    jax.debug.callback(lambda u_, w_: estep_in.append((np.asarray(u_), np.asarray(w_))), u, est.weights)
    return est
  monkeypatch.setattr(vsd_estep, "estep_weights", spy)
  method = build_vsd(_vsd_config(), target, vocab)
  batch = dict(input_ids=tiny.ids, attention_mask=tiny.valid, loss_mask=tiny.loss_mask)
  def loss(params, target_params):
    return method.loss_fn(params, dict(method.frozen, target=target_params), batch, jax.random.PRNGKey(0),
                          method.method_state)

  (loss, (metrics, state)), (g_params, g_frozen) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      tiny.dparams, method.frozen["target"])
  assert np.isfinite(float(loss))
  for path, g in jax.tree_util.tree_leaves_with_path(g_frozen):
    if jnp.issubdtype(g.dtype, jnp.floating):
      assert float(jnp.max(jnp.abs(g))) == 0.0, jax.tree_util.keystr(path)
  norms = {jax.tree_util.keystr(p): float(jnp.linalg.norm(g)) for p, g in jax.tree_util.tree_leaves_with_path(g_params)}
  assert all(v > 0 for k, v in norms.items() if "lm_head" in k or "fc" in k or "q_proj" in k), norms
  assert 0 < float(metrics["anchors"]) <= B * M
  # The E-step monitors by their definitions (VSD_METHOD.md sections 3 and 7) over the anchors: supported = some
  # U > 0; ELBO of the weighted sample r = w, E_r[log U] - KL(r || uniform over the S proposals), averaged over
  # the supported anchors, and below log mean_s U there (equal only for w = U / sum U).
  jax.effects_barrier()
  assert estep_in, "the VSD loss no longer calls estep.estep_weights: update the spy"
  u, w = estep_in[-1]
  anchors, sup = float(metrics["anchors"]), np.any(u > 0, axis=-1)
  assert 0 < sup.sum() < len(sup)  # both kinds of anchor occur
  np.testing.assert_allclose(w.sum(-1), sup.astype(float), atol=1e-6)
  np.testing.assert_allclose(float(metrics["supported"]), sup.sum() / anchors, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["mean_u"]), u.sum() / (anchors * S), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["log_mean_u"]), np.log(u.sum() / (anchors * S)), rtol=1e-5)
  pos = w > 0
  elbo = (np.sum(np.where(pos, w * np.log(np.where(pos, u, 1.0)), 0.0), -1)
          - np.sum(np.where(pos, w * np.log(np.where(pos, w * S, 1.0)), 0.0), -1))
  np.testing.assert_allclose(float(metrics["elbo"]), elbo[sup].mean(), rtol=1e-5, atol=1e-6)
  assert np.all(elbo[sup] <= np.log(u[sup].mean(-1)) + 1e-6)
  # One bias-corrected EMA step from the zero state (ema_decay 0.9): a depth some path reached gets weight 0.1
  # and ema 0.1 * c_k (depth 1 is always reached); c_ema_k, read before the update, is the 0.5 default.
  weight, ema = np.asarray(state["weight"]), np.asarray(state["ema"])
  c_batch = np.array([float(metrics[f"c_{k + 1}"]) for k in range(K)])
  assert weight.shape == (K,) and np.isclose(weight[0], 0.1) and np.all(np.isclose(weight, 0.1) | (weight == 0))
  np.testing.assert_allclose(ema, np.where(weight > 0, 0.1 * c_batch, 0.0), rtol=1e-5, atol=1e-7)
  assert all(float(metrics[f"c_ema_{k + 1}"]) == 0.5 for k in range(K))


@pytest.mark.slow
def test_vsd_loss_terms_switch_off(tiny, monkeypatch):
  """lambda_car = 0 and mu = 0 leave the ARW term alone; arw=False is the plain EM likelihood."""
  target = types.SimpleNamespace(model=tiny.model, params=tiny.params, config=tiny.model.cfg)
  vocab = types.SimpleNamespace(d2t=np.asarray(tiny.d2t), t2d=np.asarray(tiny.t2d))
  batch = dict(input_ids=tiny.ids, attention_mask=tiny.valid, loss_mask=tiny.loss_mask)
  dparams = tiny_setup()[4]  # the random draft: the trained one's weighted paths are all accepted in full
  # The E-step sample the M-step sees: log q(z_k) [A, S, K] and the posterior weights w [A, S].
  sample = []
  weighted_path_loss = vsd_mstep.weighted_path_loss
  def spy(logq, like_w, unlike_w, path_w, **kw):
    jax.debug.callback(lambda lq, w: sample.append((np.asarray(lq), np.asarray(w))), logq, path_w)
    return weighted_path_loss(logq, like_w, unlike_w, path_w, **kw)
  monkeypatch.setattr(vsd_mstep, "weighted_path_loss", spy)
  out = {}
  for name, kw in dict(full={}, arw_only=dict(lambda_car=0.0, mu=0.0), em=dict(arw=False, lambda_car=0.0, mu=0.0),
                       snis=dict(estep="snis"), all_anchors=dict(arw_norm="all")).items():
    method = build_vsd(_vsd_config(**kw), target, vocab)
    loss, (m, _) = jax.jit(method.loss_fn)(dparams, method.frozen, batch, jax.random.PRNGKey(0),
                                           method.method_state)
    jax.effects_barrier()
    assert sample, "the VSD loss no longer calls mstep.weighted_path_loss: update the spy"
    out[name] = (float(loss), {k: float(v) for k, v in m.items()}, sample[-1])
  full, arw_only, em = out["full"], out["arw_only"], out["em"]
  np.testing.assert_allclose(arw_only[0], full[1]["loss_arw"], rtol=1e-5)
  assert full[1]["loss_car"] > 0 and full[1]["loss_eagle3"] > 0  # the terms switched off are really there
  np.testing.assert_allclose(full[0], full[1]["loss_arw"] + 0.5 * full[1]["loss_car"] + full[1]["loss_eagle3"],
                             rtol=1e-5)
  # Same key, same E-step sample; arw=False weights every token of it: -sum_(a,s) w * sum_k log q(z_k) / #anchors
  # (gamma = 1), the exact EM M-step objective -E_r[log q(z)].
  (logq, w), (logq_em, w_em) = arw_only[2], em[2]
  np.testing.assert_allclose(logq_em, logq, rtol=1e-6)
  np.testing.assert_array_equal(w_em, w)
  anchors = np.sum(np.any(w > 0, axis=-1))
  assert anchors > 0
  np.testing.assert_allclose(em[0], -np.sum(w[..., None] * logq) / anchors, rtol=1e-5)
  assert abs(em[0] - arw_only[0]) > 1e-3  # a path rejected part-way: ARW weighs it otherwise (not vacuous)
  assert out["snis"][1]["chain_accept"] == 1.0
  # arw_norm="all" divides ARW by every existing anchor instead of the supported ones
  m_all = out["all_anchors"][1]
  assert 0 < full[1]["supported"] < 1  # some anchors unsupported, or the two divisors agree (vacuous)
  np.testing.assert_allclose(m_all["loss_arw"], full[1]["loss_arw"] * full[1]["supported"], rtol=1e-5)


def test_vsd_config_errors_name_the_field():
  c = _vsd_config(burn_in=S)
  with pytest.raises(ValueError, match="vsd.burn_in"):
    resolve(c)
  with pytest.raises(ValueError, match="vsd.estep"):
    resolve(_vsd_config(estep="gibbs"))
  with pytest.raises(ValueError, match="vsd.draft_temperature"):
    resolve(_vsd_config(estep="mcmc", draft_temperature=0.0))
  resolve(_vsd_config(estep="exact", depth=2))  # vsd.exact's objective, dispatched by make_vsd_loss
  with pytest.raises(ValueError, match=r"vsd.depth=4.*draft.ttt_steps=2"):  # it reads the first K TTT steps
    resolve(_vsd_config(estep="exact"))
  with pytest.raises(ValueError, match="vsd.arw_norm"):
    resolve(_vsd_config(arw_norm="some"))
  with pytest.raises(ValueError, match="vsd.eagle3_grad_share"):
    resolve(_vsd_config(eagle3_grad_share=1.0))
  with pytest.raises(ValueError, match="vsd.eagle3_grad_share.*mu > 0"):
    resolve(_vsd_config(eagle3_grad_share=0.5, mu=0.0))


@pytest.mark.slow
def test_sampled_vsd_with_eagle3_grad_share(tiny):
  """eagle3_grad_share on the sampled VSD loss: same loss and metrics for the same key; the gradients at two shares
  and without one satisfy g = g_e3 + c g_x with c proportional to (1 - share) / share, and the recovered terms'
  norm ratio is the one c was built from (methods/grad_share.py)."""
  target = types.SimpleNamespace(model=tiny.model, params=tiny.params, config=tiny.model.cfg)
  vocab = types.SimpleNamespace(d2t=np.asarray(tiny.d2t), t2d=np.asarray(tiny.t2d))
  batch = dict(input_ids=tiny.ids, attention_mask=tiny.valid, loss_mask=tiny.loss_mask)
  dparams = tiny_setup()[4]

  def run(**kw):
    method = build_vsd(_vsd_config(**kw), target, vocab)
    f = lambda p: method.loss_fn(p, method.frozen, batch, jax.random.PRNGKey(0), method.method_state)  # noqa: E731
    (loss, (m, _)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(dparams)
    flat = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    return float(loss), {k: float(v) for k, v in m.items()}, np.asarray(flat, np.float64)

  loss0, m0, g0 = run()
  (loss1, m1, g1), (loss2, _, g2) = run(eagle3_grad_share=0.5), run(eagle3_grad_share=0.8)
  np.testing.assert_allclose([loss1, loss2], loss0, rtol=1e-6)
  assert m1.keys() == m0.keys() and abs(m1["loss_arw"] - m0["loss_arw"]) <= 1e-6 * abs(m0["loss_arw"])
  r1, r2 = 1.0, 0.25                                   # (1 - share) / share
  d1, d2 = g1 - g0, g2 - g0                            # (k r - 1) g_x each, k = |g_e3| / |g_x|
  assert np.linalg.norm(d1) > 1e-4 * np.linalg.norm(g0)  # the share changes the gradient (not vacuous)
  cos = d1 @ d2 / (np.linalg.norm(d1) * np.linalg.norm(d2))
  assert abs(abs(cos) - 1) < 1e-3, cos                 # both differences lie along g_x
  kgx = (g1 - g2) / (r1 - r2)                          # = k g_x
  k = 1.0 / (r1 - (d1 @ kgx) / (kgx @ kgx))            # d1 . kgx / |kgx|^2 = (k r1 - 1) / k = r1 - 1 / k
  gx = kgx / k
  ge3 = g0 - gx
  np.testing.assert_allclose(np.linalg.norm(ge3) / np.linalg.norm(gx), k, rtol=2e-3)


# ---------------------------------------------------------------- exact EM on an enumerable toy
def test_exact_em_increases_log_expected_utility():
  """q: an autoregressive table over paths of K=3 tokens from a vocab of 3 (27 paths); U from greedy
  acceptance against fixed target argmaxes. E-step: the exact posterior (snis over all paths weighted by q);
  M-step: minimise the library's weighted path loss (like=1, unlike=0). J = log E_q[U] rises every time."""
  v, k = 3, 3
  paths = jnp.asarray(list(itertools.product(range(v), repeat=k)), jnp.int32)        # [27, 3]
  target_argmax = jnp.array([[2, 0, 1], [1, 1, 0], [0, 2, 2]])  # argmax at step j given previous token
  prev = jnp.concatenate([jnp.zeros((27, 1), jnp.int32), paths[:, :-1]], axis=1)
  a = (paths == jnp.stack([target_argmax[j][prev[:, j]] for j in range(k)], axis=1)).astype(jnp.float32)
  a = a.at[:, 0].set((paths[:, 0] == 1).astype(jnp.float32))
  u = vsd_utility.expected_length(a)                                                 # [27]

  def logq_tokens(theta):  # theta: [K, V, V] logits of z_j given z_{j-1} (z_0 := 0)
    lp = jax.nn.log_softmax(theta, axis=-1)
    return jnp.stack([lp[j][prev[:, j], paths[:, j]] for j in range(k)], axis=1)   # [27, K]

  def log_j(theta):
    return jax.scipy.special.logsumexp(jnp.sum(logq_tokens(theta), 1) + jnp.log(jnp.maximum(u, 1e-30)))

  theta = jax.random.normal(jax.random.PRNGKey(0), (k, v, v))
  tx = optax.adam(0.1)
  js = [float(log_j(theta))]
  for _ in range(6):
    w = vsd_estep.snis_weights((jnp.exp(jnp.sum(logq_tokens(theta), 1)) * u)[None]).weights[0]  # exact posterior
    loss = lambda th: vsd_mstep.weighted_path_loss(logq_tokens(th)[None], jnp.ones((1, 27, k)),
                                                   jnp.zeros((1, 27, k)), w[None])
    opt = tx.init(theta)
    step = jax.jit(lambda th, o: (lambda g: (optax.apply_updates(th, tx.update(g, o)[0]), tx.update(g, o)[1]))(
        jax.grad(loss)(th)))
    for _ in range(300):
      theta, opt = step(theta, opt)
    js.append(float(log_j(theta)))
  assert all(b > a_ + 1e-6 for a_, b in zip(js, js[1:])), js
  assert js[-1] > js[0] + 0.5


@pytest.mark.slow
def test_init_from_a_trained_draft(tiny, tmp_path):
  """draft.init_from starts either method from an exported draft; another draft vocabulary is refused."""
  from vsd_jax.methods import build_method
  from vsd_jax.weights.draft_io import DraftMismatchError, save_draft

  target = types.SimpleNamespace(model=tiny.model, params=tiny.params, config=tiny.model.cfg)
  vocab = types.SimpleNamespace(d2t=np.asarray(tiny.d2t), t2d=np.asarray(tiny.t2d))
  save_draft(str(tmp_path / "d"), tiny.draft.cfg, tiny.dparams, tiny.d2t, tiny.t2d, tiny.model.cfg)
  for name in ("eagle3", "vsd"):
    c = _vsd_config()
    c.method = name
    c.draft.init_from = str(tmp_path / "d")
    import flax.linen as nn
    got = nn.unbox(jax.jit(build_method(c, target, vocab).init_params)(jax.random.PRNGKey(5)))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(tiny.dparams)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  d2t, t2d = vocab_maps(8, range(1, 7))
  other = types.SimpleNamespace(d2t=np.asarray(d2t), t2d=np.asarray(t2d))
  with pytest.raises(DraftMismatchError, match="draft vocabulary"):
    build_method(c, target, other)


@pytest.mark.slow
def test_init_head_from_target(tiny):
  """draft.init_head='target': lm_head column i is the target's output row of draft token i (tied embedding),
  the final norm is the target's, everything else is the random init; an unknown value is refused."""
  import flax.linen as nn

  from vsd_jax.methods import build_method

  target = types.SimpleNamespace(model=tiny.model, params=tiny.params, config=tiny.model.cfg)
  vocab = types.SimpleNamespace(d2t=np.asarray(tiny.d2t), t2d=np.asarray(tiny.t2d))
  c = _vsd_config()
  c.method = "eagle3"
  rand = nn.unbox(jax.jit(build_method(c, target, vocab).init_params)(jax.random.PRNGKey(3)))
  c.draft.init_head = "target"
  got = nn.unbox(jax.jit(build_method(c, target, vocab).init_params)(jax.random.PRNGKey(3)))
  emb = np.asarray(tiny.params["embed_tokens"]["embedding"])
  ids = np.flatnonzero(np.asarray(tiny.t2d))
  np.testing.assert_array_equal(np.asarray(got["lm_head"]["kernel"]), emb[ids].T)
  np.testing.assert_array_equal(np.asarray(got["norm"]["scale"]), np.asarray(tiny.params["norm"]["scale"]))
  assert not np.array_equal(np.asarray(rand["lm_head"]["kernel"]), np.asarray(got["lm_head"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(got["fc"]["kernel"]), np.asarray(rand["fc"]["kernel"]))
  c.draft.init_head = "embedding"
  with pytest.raises(ValueError, match="init_head"):
    build_method(c, target, vocab)


@pytest.mark.slow
def test_heldout_metrics_equal_the_eagle3_loss(tiny):
  """The held-out report's one pass (the method's heldout_metrics_fn) gives EAGLE-3's own per-step agreement, and
  leaves the config as it was."""
  from vsd_jax.data.dataset import SequenceDataset
  from vsd_jax.methods import eagle3
  from vsd_jax.training.heldout import heldout_config, heldout_metrics

  target = types.SimpleNamespace(model=tiny.model, params=tiny.params, config=tiny.model.cfg)
  vocab = types.SimpleNamespace(d2t=np.asarray(tiny.d2t), t2d=np.asarray(tiny.t2d))
  lengths = np.asarray(tiny.valid).sum(1)
  ds = SequenceDataset([np.asarray(tiny.ids)[i, :n] for i, n in enumerate(lengths)],
                       [np.asarray(tiny.loss_mask)[i, :n] for i, n in enumerate(lengths)])
  c = _vsd_config()
  c.train.batch_size, c.data.buckets = B, (T,)
  before = c.to_dict()
  ev = heldout_config(c)
  got = heldout_metrics(ev, target, vocab, tiny.dparams, ds)
  assert c.to_dict() == before and ev.vsd.to_dict() == c.vsd.to_dict()
  base = eagle3.build(ev, target, vocab)
  eagle_loss, frozen = base.loss_fn, base.frozen
  batch = dict(input_ids=tiny.ids, attention_mask=tiny.valid.astype(jnp.int32), loss_mask=tiny.loss_mask)
  _, m = eagle_loss(tiny.dparams, frozen, batch, None)
  want = [float(m[f"acc_{k}"]) for k in range(c.draft.ttt_steps)]
  np.testing.assert_allclose(got["step_acc"], want, atol=1e-6)
  assert max(want) > 0  # the trained tiny draft agrees somewhere: the comparison is not 0 == 0
  assert got["sequences"] == B and got["chain"]["anchors"] > 0 and got["chain"]["tau_chain"] >= 1.0


def test_stochastic_utility_equals_chain_verifier_acceptance():
  """The stochastic utility U = sum_k prod_{j<=k} min(1, p_j/q_j) of a draft chain is the expected number of its
  tokens that chain speculative sampling (decoding/verify.chain_verify, T=1) accepts; and prod_{j<=k} a_j is
  P(accepted >= k). 20,000 verifier draws of one fixed chain, 4-sigma bounds."""
  from vsd_jax.decoding.tree import Tree
  from vsd_jax.decoding.verify import chain_verify
  k_depth, v = 3, 5
  rng = np.random.default_rng(3)
  p_logits = jnp.asarray(rng.normal(size=(k_depth + 1, v)) * 1.5, jnp.float32)   # target at nodes 0..K
  q = rng.dirichlet(np.ones(v), size=k_depth + 1).astype(np.float32)             # draft at nodes 1..K
  z = np.array([2, 4, 3])  # for this seed min(1, p/q) = 0.52, 1, 0.28 at these tokens: U = 1.19
  t = k_depth + 1
  tree = Tree(tokens=jnp.asarray([[0, *z]], jnp.int32), parents=jnp.asarray([np.maximum(np.arange(t) - 1, 0)]),
              depths=jnp.arange(t)[None], ancestors=jnp.tril(jnp.ones((t, t), bool))[None],
              scores=jnp.zeros((1, t)), children=jnp.asarray([np.where(np.arange(t) < k_depth, np.arange(t) + 1,
                                                                         -1)[:, None]], jnp.int32),
              q_probs=jnp.asarray(q)[None])
  draws = 20000
  m = jax.vmap(lambda key: chain_verify(tree, p_logits[None], key, jnp.arange(v), 1.0)[1][0])(
      jax.random.split(jax.random.PRNGKey(0), draws))
  m = np.asarray(m)
  p = reduce_logits(p_logits[None, :k_depth], jnp.asarray(z)[None])        # p_k at the parent of z_k
  q_z = jnp.asarray(q[np.arange(1, t), z])[None]
  a = vsd_utility.acceptance("stochastic", jnp.asarray(z)[None], q_z, p.argmax, p.token_prob)
  u = float(vsd_utility.expected_length(a)[0])
  assert 0.3 < u < k_depth - 0.3  # not a trivial chain: some tokens are rejected sometimes
  assert abs(m.mean() - u) < 4 * m.std() / np.sqrt(draws), (m.mean(), u)
  reach = np.cumprod(np.asarray(a[0]))
  for k in range(1, k_depth + 1):
    freq = np.mean(m >= k)
    assert abs(freq - reach[k - 1]) < 4 * np.sqrt(reach[k - 1] * (1 - reach[k - 1]) / draws) + 1e-3, (k, freq)

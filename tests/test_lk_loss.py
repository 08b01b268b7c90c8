"""The LK losses (draft.objective "lk_alpha" / "lk_lambda", arXiv 2602.23881): the acceptance rate against its
definition (1 - total variation), the step objectives' values and gradients, the whole TTT loss against a
row-by-row reference and jax.grad of an independent form, the target's draft-vocabulary mass, training with it,
and the config switch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_eagle3 import N_DRAFT, B, T, make_tiny
from vsd_jax.config_base import base_config
from vsd_jax.methods.eagle3.loss import (acceptance_rate, eagle3_loss, lk_step_loss, soft_labels, ttt_unroll)
from vsd_jax.resolved import resolve


def test_acceptance_rate_is_one_minus_total_variation():
  p = np.array([0.5, 0.3, 0.2, 0.0])
  q = np.array([0.2, 0.3, 0.1, 0.4])
  tv = 0.5 * np.abs(p - q).sum()                                 # 0.5 * (0.3 + 0 + 0.1 + 0.4) = 0.4
  assert float(acceptance_rate(jnp.asarray(p), jnp.asarray(q))) == pytest.approx(1 - tv, abs=1e-7)
  assert float(acceptance_rate(jnp.asarray(p), jnp.asarray(q))) == pytest.approx(0.6, abs=1e-7)
  # Target mass outside the draft vocabulary is never accepted: p restricted to the draft ids, not renormalised.
  p_full = np.array([0.4, 0.1, 0.3, 0.2])            # the draft vocabulary is ids 0 and 2 (mass 0.7)
  q_draft = np.array([0.5, 0.5])
  assert float(acceptance_rate(jnp.asarray(p_full[[0, 2]]), jnp.asarray(q_draft))) == pytest.approx(0.7)
  # Identical distributions are always accepted; disjoint ones never.
  assert float(acceptance_rate(jnp.asarray(q), jnp.asarray(q))) == pytest.approx(1.0)
  assert float(acceptance_rate(jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 1.0]))) == 0.0


def test_step_objectives_values_and_gradients():
  kl, alpha, log_alpha = jnp.float32(2.0), jnp.float32(0.4), jnp.float32(np.log(0.3))
  assert float(lk_step_loss("kl", kl, alpha, log_alpha)) == pytest.approx(2.0)
  assert float(lk_step_loss("lk_alpha", kl, alpha, log_alpha)) == pytest.approx(-np.log(0.3), rel=1e-6)
  w = 1.5 * np.exp(-2.0 * 0.4)
  got = lk_step_loss("lk_lambda", kl, alpha, log_alpha, kl_scale=1.5, kl_decay=2.0)
  assert float(got) == pytest.approx(w * 2.0 + (1 - w) * 0.6, rel=1e-6)
  # The KL weight is held constant: d/dkl = w, d/dalpha = -(1 - w) (no term through w).
  g_kl, g_alpha = jax.grad(lambda a, b: lk_step_loss("lk_lambda", a, b, log_alpha, 1.5, 2.0), (0, 1))(kl, alpha)
  assert float(g_kl) == pytest.approx(w, rel=1e-6)
  assert float(g_alpha) == pytest.approx(-(1 - w), rel=1e-6)
  with pytest.raises(ValueError, match="draft.objective='lk'"):
    lk_step_loss("lk", kl, alpha, log_alpha)


@pytest.fixture(scope="module")
def tiny():
  """The EAGLE-3 tests' tiny target with milder logits (every acceptance rate well above 0) and a loss mask with
  prompt tokens and a hole."""
  t = make_tiny(embed_scale=10.0, ids_seed=3, vocab_seed=4)
  mask = np.ones((B, T), np.int32)
  mask[:, :3] = 0
  mask[1, 7] = 0
  return dict(t, mask=jnp.asarray(mask))


def _lk_by_definition(step_logits, target_logits, loss_mask, d2t, objective, decay=0.8, scale=1.0, kdecay=1.0):
  """The LK TTT loss one row at a time (float64): step k's rows are t with t+2+k < T and x_{t+2+k} a loss token;
  alpha = sum over the draft ids of min(p(v), q(v)), p the target's softmax over the WHOLE vocabulary at t+1+k.
  "lk_alpha" = -mean log alpha; "lk_lambda" uses the KL over the rows whose target argmax is in the draft vocab."""
  ids = np.arange(len(d2t)) + np.asarray(d2t)
  total, alphas = 0.0, []
  for k, lg in enumerate(np.asarray(step_logits, np.float64)):
    a_rows, kls = [], []
    for b in range(lg.shape[0]):
      for t in range(lg.shape[1] - 2 - k):
        if not loss_mask[b, t + 2 + k]:
          continue
        tl = np.asarray(target_logits[b, t + 1 + k], np.float64)
        p = np.exp(tl - tl.max())
        p /= p.sum()
        q = np.exp(lg[b, t] - lg[b, t].max())
        q /= q.sum()
        a_rows.append(np.minimum(p[ids], q).sum())
        if np.argmax(tl) in set(ids.tolist()):
          kls.append(-np.sum(p[ids] / p[ids].sum() * np.log(q)))
    alpha = np.mean(a_rows)
    alphas.append(alpha)
    if objective == "lk_alpha":
      step = -np.mean(np.log(a_rows))
    else:
      w = scale * np.exp(-kdecay * alpha)
      step = w * np.mean(kls) + (1 - w) * (1 - alpha)
    total += decay ** k * step
  return total, alphas


loss_fn = jax.jit(eagle3_loss, static_argnums=1, static_argnames=("num_steps", "objective", "lk_kl_scale",
                                                                  "lk_kl_decay"))


@pytest.mark.parametrize("objective,scale,kdecay", [("lk_alpha", 1.0, 1.0), ("lk_lambda", 1.0, 1.0),
                                                    pytest.param("lk_lambda", 0.7, 3.0, marks=pytest.mark.slow)])
def test_ttt_loss_matches_row_by_row_reference(tiny, objective, scale, kdecay):
  args = (tiny["draft"], tiny["emb"], tiny["feats"], tiny["ids"], tiny["logits"], tiny["mask"], tiny["t2d"],
          tiny["d2t"])
  loss, m = loss_fn(tiny["dparams"], *args, num_steps=3, objective=objective, lk_kl_scale=scale, lk_kl_decay=kdecay)
  step_logits = jax.jit(ttt_unroll, static_argnums=(1, 5))(tiny["dparams"], tiny["draft"], tiny["emb"], tiny["feats"],
                                                           tiny["ids"], 3)
  want, alphas = _lk_by_definition(step_logits, np.asarray(tiny["logits"]), np.asarray(tiny["mask"]),
                                   np.asarray(tiny["d2t"]), objective, scale=scale, kdecay=kdecay)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(m["step_alpha"]), alphas, rtol=2e-5)
  # The KL objective reports the same acceptance rates (a monitor there) and a different loss.
  kl_loss, mk = loss_fn(tiny["dparams"], *args, num_steps=3)
  np.testing.assert_allclose(np.asarray(mk["step_alpha"]), alphas, rtol=2e-5)
  assert abs(float(kl_loss) - want) > 1e-2


@pytest.mark.slow
def test_lk_alpha_gradient_equals_an_independent_form(tiny):
  """jax.grad of the library's LK loss == jax.grad of -sum_k 0.8^k mean log sum_v min(p, q) written directly on
  ttt_unroll's logits and the full target softmax (the draft-vocabulary columns gathered by index)."""
  args = (tiny["draft"], tiny["emb"], tiny["feats"], tiny["ids"], tiny["logits"], tiny["mask"], tiny["t2d"],
          tiny["d2t"])
  ids = jnp.arange(N_DRAFT) + tiny["d2t"]
  p = jax.nn.softmax(tiny["logits"], axis=-1)[..., ids]                        # [B, T, N], not renormalised
  mask = np.asarray(tiny["mask"]).astype(bool)

  def reference(params):
    steps = ttt_unroll(params, tiny["draft"], tiny["emb"], tiny["feats"], tiny["ids"], 3)   # [K, B, T, N]
    total = 0.0
    for k in range(3):
      rows = np.zeros((B, T), bool)
      rows[:, :T - 2 - k] = mask[:, 2 + k:]
      alpha = jnp.sum(jnp.minimum(p[:, 1 + k:T - 1], jax.nn.softmax(steps[k][:, :T - 2 - k], axis=-1)), -1)
      total = total + 0.8 ** k * -jnp.sum(jnp.where(rows[:, :T - 2 - k], jnp.log(alpha), 0.0)) / rows.sum()
    return total

  g_lib = jax.jit(jax.grad(lambda q: eagle3_loss(q, *args, num_steps=3, objective="lk_alpha")[0]))(tiny["dparams"])
  g_ref = jax.jit(jax.grad(reference))(tiny["dparams"])
  flat_lib, flat_ref = jax.tree.leaves(g_lib), jax.tree.leaves(g_ref)
  norm = max(float(jnp.max(jnp.abs(x))) for x in flat_ref)
  assert norm > 1e-4
  for a, b in zip(flat_lib, flat_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * norm)


def test_soft_labels_draft_mass(tiny):
  lab = soft_labels(tiny["logits"], tiny["t2d"], tiny["d2t"])
  p = np.asarray(jax.nn.softmax(tiny["logits"], axis=-1))
  want = p[..., np.asarray(tiny["t2d"])].sum(-1)
  np.testing.assert_allclose(np.asarray(lab.draft_mass), want, rtol=1e-5)
  assert np.all(want < 1.0 - 1e-6)        # some mass outside the draft vocabulary: the test can tell


def test_lk_training_raises_acceptance(tiny):
  args = (tiny["draft"], tiny["emb"], tiny["feats"], tiny["ids"], tiny["logits"], tiny["mask"], tiny["t2d"],
          tiny["d2t"])
  opt = optax.adam(3e-3)

  @jax.jit
  def update(params, state):
    (loss, m), g = jax.value_and_grad(lambda q: eagle3_loss(q, *args, num_steps=3, objective="lk_lambda"),
                                      has_aux=True)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss, m

  params, state = tiny["dparams"], opt.init(tiny["dparams"])
  alphas, losses = [], []
  for _ in range(16):
    params, state, loss, m = update(params, state)
    alphas.append(float(m["step_alpha"][0]))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] and alphas[-1] > alphas[0] + 0.02, (losses, alphas)


def test_config_switch():
  c = base_config()
  assert resolve(c).draft.ttt_loss_options()["objective"] == "kl"
  c.draft.objective = "lk_lambda"
  c.draft.lk_kl_scale = 0.5
  o = resolve(c).draft.ttt_loss_options()
  assert (o["objective"], o["lk_kl_scale"], o["num_steps"]) == ("lk_lambda", 0.5, int(c.draft.ttt_steps))
  c.draft.objective = "tv"
  with pytest.raises(ValueError, match=r"config.draft.objective='tv'.*kl.*lk_alpha.*lk_lambda"):
    resolve(c)
  c.draft.objective, c.draft.lk_kl_decay = "lk_lambda", -1.0
  with pytest.raises(ValueError, match="lk_kl_decay=-1.0"):
    resolve(c)

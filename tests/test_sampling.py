"""Statistical checks of the token sampler against the distribution it claims to sample."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from vsd_jax.decoding.sampling import sample_token, warp_logits

N = 40000


def _counts(logits, temperature, top_p, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), N)
  toks = jax.vmap(lambda k: sample_token(logits, k, temperature, top_p))(keys)
  return np.bincount(np.asarray(toks), minlength=logits.shape[-1])


def _expected(logits, temperature, top_p):
  p = np.exp(np.asarray(logits, np.float64) / temperature)
  p /= p.sum()
  order = np.argsort(-p)
  keep = np.zeros_like(p, bool)
  mass = 0.0
  for i in order:  # the nucleus by its definition: smallest prefix with mass >= top_p
    keep[i] = True
    mass += p[i]
    if mass >= top_p:
      break
  q = np.where(keep, p, 0.0)
  return q / q.sum()


def test_temperature_and_top_p_sampling_match_definition():
  logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  for t, top_p in [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)]:
    counts = _counts(logits, t, top_p)
    exp = _expected(logits, t, top_p)
    assert (counts[exp == 0] == 0).all(), "sampled a token outside the nucleus"
    nz = exp > 0
    chi2 = stats.chisquare(counts[nz], exp[nz] * N)
    assert chi2.pvalue > 1e-3, (t, top_p, counts, exp * N)


def test_sampler_detects_a_wrong_temperature():
  """Power check: the same test rejects samples drawn at another temperature."""
  logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  counts = _counts(logits, 1.0, 1.0)
  exp = _expected(logits, 0.8, 1.0)
  assert stats.chisquare(counts, exp * N).pvalue < 1e-6


def test_greedy_and_warp():
  logits = jnp.asarray([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
  assert np.asarray(sample_token(logits, jax.random.PRNGKey(0), 0.0)).tolist() == [1, 0]
  # warp_logits is the log of the sampling distribution's definition (temperature, then the top-p nucleus).
  row = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  for t, top_p in [(1.0, 1.0), (0.5, 1.0), (1.3, 0.8), (1.0, 0.5)]:
    got = np.exp(np.asarray(warp_logits(jnp.stack([row, row[::-1]]), t, top_p)))
    want = _expected(row, t, top_p)
    np.testing.assert_allclose(got, np.stack([want, want[::-1]]), rtol=1e-5, atol=1e-7, err_msg=f"T={t} top_p={top_p}")

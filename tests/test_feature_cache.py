"""Precomputed target features (train.target_features="precomputed") give the in-step EAGLE-3 loss."""

import os
import types

import jax
import numpy as np
import pytest

from tests.tiny_models import tiny_target, vocab_maps
from vsd_jax.config_base import base_config
from vsd_jax.data.dataset import SequenceDataset, iterate_batches
from vsd_jax.methods import eagle3
from vsd_jax.training.feature_cache import build_feature_cache, cache_key, with_cached_targets


def _dataset(n=10, seed=0):
  rng = np.random.default_rng(seed)
  seqs, masks = [], []
  for _ in range(n):
    length = int(rng.integers(8, 20))
    seqs.append(rng.integers(0, 8, length))
    masks.append((np.arange(length) >= 4).astype(np.int32))
  return SequenceDataset(seqs, masks)


@pytest.mark.slow
def test_precomputed_loss_equals_in_step_loss(tmp_path):
  model, params = tiny_target()
  target = types.SimpleNamespace(model=model, params=params, config=model.cfg)
  d2t, t2d = vocab_maps(8, range(2, 8))
  vocab = types.SimpleNamespace(d2t=np.asarray(d2t), t2d=np.asarray(t2d))
  c = base_config()
  c.draft.ttt_steps = 3
  m = eagle3.build(c, target, vocab)
  init_params, loss_fn, frozen = m.init_params, m.loss_fn, m.frozen
  import flax.linen as nn
  draft_params = nn.unbox(init_params(jax.random.PRNGKey(0)))
  ds = _dataset()
  cache = build_feature_cache(target, ds, vocab.d2t, vocab.t2d, str(tmp_path / "f"), batch_size=4, buckets=(20,))
  assert os.path.isfile(tmp_path / "f" / "meta.json")
  fn = jax.jit(loss_fn)
  plain = list(iterate_batches(ds, 4, seed=1, buckets=(12, 20), drop_last=False))
  cached = list(with_cached_targets(iterate_batches(ds, 4, seed=1, buckets=(12, 20), drop_last=False, with_index=True),
                                    cache, vocab.t2d))
  assert len(plain) == len(cached) == 3   # the last batch has pad rows (index -1)
  for a, b in zip(plain, cached):
    assert "index" not in b and b["features"].shape[:2] == a["input_ids"].shape
    la, ma = fn(draft_params, frozen, a, jax.random.PRNGKey(0))
    lb, mb = fn(draft_params, frozen, b, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(lb), float(la), rtol=2e-3)   # float16 storage
    for k in ("acc_0", "acc_1", "num_tokens"):
      np.testing.assert_allclose(float(mb[k]), float(ma[k]), atol=1e-6, err_msg=k)
  # A finished pass is reused; the key changes with the data, target or vocabulary.
  again = build_feature_cache(target, ds, vocab.d2t, vocab.t2d, str(tmp_path / "f"), batch_size=4, buckets=(20,))
  for i in range(len(ds)):
    np.testing.assert_array_equal(again.sequence(i)["target_top"], cache.sequence(i)["target_top"])
  k = cache_key(ds, "m", vocab.d2t)
  assert k != cache_key(_dataset(seed=1), "m", vocab.d2t) and k != cache_key(ds, "other", vocab.d2t)

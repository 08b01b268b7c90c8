"""The decoding-shape autotuner: its acceptance replay is exact, and its choice is cached per device and model."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsd_jax.decoding import autotune
from vsd_jax.decoding.runner import pad_prompts
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig

from tests.tiny_models import tiny_setup

SHAPES = [TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain"),
          TreeConfig(depth=1, top_k=1, total_tokens=1, mode="chain"),
          TreeConfig(depth=3, top_k=2, total_tokens=4, mode="tree"),
          TreeConfig(depth=3, top_k=2, total_tokens=7, mode="tree"),
          TreeConfig(depth=2, top_k=3, total_tokens=5, mode="tree")]


@pytest.fixture(scope="module")
def tiny():
  model, params, draft, trained, _, d2t, _ = tiny_setup()
  target = types.SimpleNamespace(model=model, params=params, config=model.cfg, source="tiny-test-target")
  rng = np.random.RandomState(1)
  prompts = [list(rng.randint(0, 8, n)) for n in (3, 7, 5, 9, 4, 6)]
  return target, draft, trained, d2t, prompts


@pytest.mark.slow  # the trained tiny draft (tiny_setup) costs about a minute
def test_replay_rounds_equal_speculative_generate(tiny):
  """For every shape and prompt, the T=0 replay predicts exactly the rounds speculative_generate runs (chains
  replayed from a top-1 tree, smaller trees as the best nodes of a larger one), and the draft accepts tokens."""
  target, draft, dp, d2t, prompts = tiny
  max_new = 24
  calib = autotune.greedy_continuations(target, prompts, max_new)
  table = autotune.measure_tau(target, draft, dp, d2t, calib, SHAPES)
  ids, lens = pad_prompts(prompts, 0, multiple=16)
  for s in SHAPES[0], SHAPES[2], SHAPES[3]:  # a chain, and two trees nested in one expansion
    # rows advance independently: each row's rounds are its own decoding's
    out = speculative_generate(target.model, target.params, draft, dp, d2t, jnp.asarray(ids), jnp.asarray(lens),
                               jax.random.PRNGKey(0), tree_cfg=s, max_new_tokens=max_new,
                               cache_slots=required_slots(ids.shape[1], max_new, s))
    assert np.all(np.asarray(out.num_new) == max_new)
    assert table[autotune.shape_name(s)]["rounds"] == np.asarray(out.rounds).tolist(), autotune.shape_name(s)
  # The replay is not trivially right: deeper shapes accept more, so rounds differ between shapes.
  taus = {k: v["tau"] for k, v in table.items()}
  assert taus["chain d1"] < taus["chain d3"] <= taus["tree d3 k2 n7"]
  assert taus["chain d3"] > 1.5, taus


def test_replay_rounds_by_hand():
  # accepted[L - P]: a round at L=10 accepts 2 -> L=13 accepts 0 -> L=14 accepts 3 -> L=18 = seq_len - 1: done.
  acc = np.zeros(10, np.int32)
  acc[[0, 3, 4]] = [2, 0, 3]
  assert autotune.replay_rounds(acc, 10, 19) == 3
  assert autotune.replay_rounds(acc, 10, 11) == 0  # one new token: the prefill's


def test_verify_curve_is_monotone_envelope():
  curve = {1: 1.0, 2: 3.0, 4: 2.0, 8: 4.0}
  assert autotune._interp(curve, 2) == 2.0        # noise at 2 nodes: the 4-node time bounds it
  assert autotune._interp(curve, 6) == 3.0        # interpolated between 4 and 8
  assert autotune._interp(curve, 1) == 1.0


@pytest.mark.slow
def test_choice_is_cached_per_key(tiny, tmp_path):
  target, draft, dp, d2t, prompts = tiny
  path = str(tmp_path / "shapes.json")
  draft_dir = tmp_path / "draft"
  draft_dir.mkdir()
  (draft_dir / "draft.msgpack").write_bytes(b"weights-a")
  kw = dict(eos_ids=(), pad_id=0, max_new_tokens=12, shapes=SHAPES[:3], cache_path=path, repeats=1,
            log=lambda m: None)
  first = autotune.choose_shape(target, draft, dp, d2t, str(draft_dir), prompts[:2], **kw)
  assert not first.cached
  assert first.shape in SHAPES[:3]
  assert first.predicted_speedup == max(r["speedup"] for r in first.table)
  again = autotune.choose_shape(target, draft, dp, d2t, str(draft_dir), [], **kw)  # no prompts needed: cached
  assert again.cached and again.shape == first.shape and again.key == first.key
  # Another batch size or other draft weights are other keys: measured again.
  other = autotune.choose_shape(target, draft, dp, d2t, str(draft_dir), prompts[:2], batch=2, **kw)
  assert not other.cached and other.key != first.key
  (draft_dir / "draft.msgpack").write_bytes(b"weights-b")
  with pytest.raises(ValueError, match="calibration prompts"):
    autotune.choose_shape(target, draft, dp, d2t, str(draft_dir), [], **kw)
  assert len(json.load(open(path))) == 2


def test_explicit_shape():
  """A partly given shape takes the rest from the one defaults table, which is also TreeConfig's."""
  from vsd_jax.engine import explicit_shape
  from vsd_jax.decoding.tree import SHAPE_DEFAULTS
  assert explicit_shape() is None
  assert explicit_shape(mode="chain", depth=3) == TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain")
  assert explicit_shape(top_k=4) == TreeConfig(depth=5, top_k=4, total_tokens=12, mode="tree")
  assert explicit_shape(mode="tree") == TreeConfig() == TreeConfig(**SHAPE_DEFAULTS)

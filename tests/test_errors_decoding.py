"""Bad input to speculative decoding: tree settings, cache capacity, a draft for another target."""

import jax
import numpy as np
import pytest

from vsd_jax.decoding.runner import PromptTooLongError, check_capacity
from vsd_jax.decoding.speculative import required_slots
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.models.llama import LlamaConfig


def test_tree_settings_out_of_range():
  with pytest.raises(ValueError, match="must be >= 1"):
    TreeConfig(depth=0)
  with pytest.raises(ValueError, match="total_tokens=100 exceeds the 12 candidates"):
    TreeConfig(depth=2, top_k=3, total_tokens=100)
  with pytest.raises(ValueError, match="'beam' is not 'tree' or 'chain'"):
    TreeConfig(mode="beam")


def test_tree_larger_than_cache_allows():
  tree = TreeConfig(depth=6, top_k=8, total_tokens=60)
  extra = required_slots(0, 0, tree)
  assert extra >= 61 + 6
  with pytest.raises(PromptTooLongError, match="draft slots.*allows 256"):
    check_capacity([150], 64, 256, extra=extra)


def test_draft_for_another_target(tmp_path):
  from tests.tiny_models import tiny_target, vocab_maps
  from tests.tiny_models import init_draft_params
  from vsd_jax.models.eagle3 import Eagle3Config
  from vsd_jax.weights.draft_io import DraftMismatchError, load_draft, save_draft
  model, params = tiny_target()
  dcfg = Eagle3Config.from_target(model.cfg, draft_vocab_size=6)
  dp = init_draft_params(dcfg, jax.random.PRNGKey(0), params["embed_tokens"]["embedding"])
  d2t, t2d = vocab_maps(8, range(2, 8))
  save_draft(str(tmp_path), dcfg, dp, d2t, t2d, model.cfg)
  cfg2, dp2, d2t2, t2d2 = load_draft(str(tmp_path), model.cfg)  # round trip
  assert cfg2 == dcfg and np.array_equal(d2t2, np.asarray(d2t)) and np.array_equal(t2d2, np.asarray(t2d))
  for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(DraftMismatchError, match=r"hidden_size: draft 32 vs target 576.*num_layers: draft 4 vs "
                                                r"target 30.*vocab_size: draft 8 vs target 49152"):
    load_draft(str(tmp_path), LlamaConfig())
  with pytest.raises(FileNotFoundError, match="no trained draft"):
    load_draft(str(tmp_path / "nope"))

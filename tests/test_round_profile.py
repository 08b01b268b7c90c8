"""speculative.py's public prefill and round (what benchmarks/round_profile.py times, part by part) are
speculative_generate's own: the prefill then rounds until every row is done commit exactly its tokens, counts,
rounds and acceptance histogram."""

import jax
import numpy as np
import pytest

from tests.tiny_models import tiny_random_setup
from vsd_jax.decoding.speculative import (Round, required_slots, speculative_generate, speculative_prefill,
                                          speculative_round)
from vsd_jax.decoding.tree import TreeConfig

MAX_NEW = 20


@pytest.mark.parametrize("tree_cfg,temperature", [
    (TreeConfig(depth=3, top_k=3, total_tokens=6), 0.0),                # greedy_verify over a tree
    (TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain"), 1.0),  # chain speculative sampling
])
def test_public_prefill_and_rounds_equal_the_loop(tree_cfg, temperature):
  model, params, draft, dp, d2t, prompts, lens = tiny_random_setup()
  slots = required_slots(prompts.shape[1], MAX_NEW, tree_cfg)
  key = jax.random.PRNGKey(3)
  ref = speculative_generate(model, params, draft, dp, d2t, prompts, lens, key, tree_cfg=tree_cfg,
                             max_new_tokens=MAX_NEW, cache_slots=slots, temperature=temperature)
  r = Round(model, draft, tree_cfg, MAX_NEW, temperature=temperature)
  s = speculative_prefill(r, params, dp, prompts, lens, key, cache_slots=slots)
  for _ in range(MAX_NEW):
    if bool(np.all(np.asarray(s["done"]))):
      break
    s = speculative_round(r, params, dp, d2t, s)
  out = r.output(s)
  for field in ("tokens", "num_new", "rounds", "accept_hist"):
    np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(ref, field)), err_msg=field)
  assert int(ref.accept_hist[:, 1:].sum()) > 0  # drafts were accepted: the compaction path ran

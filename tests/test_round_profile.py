"""benchmarks/round_profile.py times a round rebuilt from speculative_generate's parts. The rebuilt rounds must
commit exactly what speculative_generate commits (same tokens, counts, rounds and acceptance histogram), or
the profile times something other than the decoding loop."""

import jax
import numpy as np
import pytest

from benchmarks.round_profile import Round
from tests.tiny_models import tiny_random_setup
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig

MAX_NEW = 20


@pytest.mark.parametrize("tree_cfg,temperature", [
    (TreeConfig(depth=3, top_k=3, total_tokens=6), 0.0),                # greedy_verify over a tree
    (TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain"), 1.0),  # chain speculative sampling
])
def test_rebuilt_rounds_equal_the_loop(tree_cfg, temperature):
  model, params, draft, dp, d2t, prompts, lens = tiny_random_setup()
  slots = required_slots(prompts.shape[1], MAX_NEW, tree_cfg)
  key = jax.random.PRNGKey(3)
  ref = speculative_generate(model, params, draft, dp, d2t, prompts, lens, key, tree_cfg=tree_cfg,
                             max_new_tokens=MAX_NEW, cache_slots=slots, temperature=temperature)
  r = Round(model, draft, tree_cfg, MAX_NEW, temperature=temperature)
  s = jax.jit(lambda tp, dp_, i, ln, k: r.prefill(tp, dp_, i, ln, k, slots))(params, dp, prompts, lens, key)
  step = jax.jit(r.step)
  for _ in range(MAX_NEW):
    if bool(np.all(np.asarray(s["done"]))):
      break
    s = step(params, dp, d2t, s)
  np.testing.assert_array_equal(np.asarray(s["tokens"])[:, :MAX_NEW], np.asarray(ref.tokens))
  for mine, theirs in (("num_new", ref.num_new), ("rounds", ref.rounds), ("hist", ref.accept_hist)):
    np.testing.assert_array_equal(np.asarray(s[mine]), np.asarray(theirs), err_msg=mine)
  assert int(ref.accept_hist[:, 1:].sum()) > 0  # drafts were accepted: the compaction path ran

"""The decoding matmul-precision option: it reaches every matmul of target and draft inside the jitted loops,
T=0 speculative output equals vanilla in both settings (CPU), and a bad value is a clear error."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.tiny_models import tiny_random_setup
from vsd_jax.decoding.precision import check_precision
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.decoding.vanilla import generate

TREE = TreeConfig(depth=3, top_k=3, total_tokens=6)
CHAIN = TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain")
MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny():
  return tiny_random_setup()


def _spec(tiny, tree_cfg, precision, lower=False):
  model, params, draft, dp, d2t, prompts, lens = tiny
  f = speculative_generate.lower if lower else speculative_generate
  return f(model, params, draft, dp, d2t, prompts, lens, jax.random.PRNGKey(0), tree_cfg=tree_cfg,
           max_new_tokens=MAX_NEW, cache_slots=required_slots(prompts.shape[1], MAX_NEW, tree_cfg),
           precision=precision)


def _vanilla(tiny, precision, lower=False):
  model, params, _, _, _, prompts, lens = tiny
  f = generate.lower if lower else generate
  return f(model, params, prompts, lens, jax.random.PRNGKey(0), 0.0, max_new_tokens=MAX_NEW, cache_slots=64,
           precision=precision)


def _dot_precisions(lowered) -> list:
  """The precision of every dot_general in a lowered program (StableHLO text)."""
  return re.findall(r"stablehlo\.dot_general.*?precision = \[(\w+), \w+\]", lowered.as_text())


@pytest.mark.parametrize("precision,name", [("highest", "HIGHEST"), ("default", "DEFAULT")])
def test_precision_reaches_every_matmul(tiny, precision, name):
  """Target prefill, verification and decode steps, draft expansion and update: every matmul carries it."""
  for lowered in (_spec(tiny, TREE, precision, lower=True), _spec(tiny, CHAIN, precision, lower=True),
                  _vanilla(tiny, precision, lower=True)):
    found = _dot_precisions(lowered)
    assert len(found) >= 10 and set(found) == {name}, found


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_greedy_speculative_equals_vanilla(tiny, precision):
  ref = _vanilla(tiny, precision)
  for cfg in (TREE, CHAIN):
    out = _spec(tiny, cfg, precision)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.num_new), np.asarray(ref.num_new))
    assert int(out.accept_hist[:, 1:].sum()) > 0, "no draft token was accepted: the compaction path went untested"


def test_bad_precision_is_a_clear_error(tiny):
  msg = r"matmul precision 'float32' is not one of default, high, highest"
  with pytest.raises(ValueError, match=msg):
    _spec(tiny, TREE, "float32", lower=True)
  with pytest.raises(ValueError, match=msg):
    _vanilla(tiny, "float32", lower=True)
  with pytest.raises(ValueError, match="'HIGHEST' is not one of"):
    check_precision("HIGHEST")
  assert check_precision(None) is None and check_precision("highest") == "highest"


@pytest.mark.parametrize("cli", ["vsd_jax.generate", "vsd_jax.evaluate"])
def test_cli_rejects_a_bad_precision(cli):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-m", cli, "--precision", "fp32"], cwd=repo, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0 and "--precision=fp32: value should be one of <default|high|highest>" in r.stderr, \
      r.stderr[-2000:]

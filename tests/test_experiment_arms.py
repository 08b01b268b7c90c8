"""Every arm of benchmarks/vsd_experiment.py is a valid configuration of configs/vsd_experiment.py: parsed as the
command line does (`cli_config.parse_config_args`: the override check, then ml_collections' flag parser -- what
`python -m vsd_jax.train --config configs/vsd_experiment.py <arm>`, the command a run's report.json records, builds),
equal to what the experiment's training worker builds (`cli_config.apply_overrides`), and accepted by `resolve`
(every field's type and range, the rules between fields). An arm with a typo would otherwise fail only after the
minutes its predecessors took."""

import importlib.util
import os
import re

import pytest

from vsd_jax.cli_config import ConfigError, apply_overrides, load_config_file, parse_config_args
from vsd_jax.resolved import Resolved, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "vsd_experiment.py")


def _module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


ARMS = _module("benchmarks/vsd_experiment.py", "vsd_experiment").ARMS


def check_arm(overrides) -> Resolved:
  """The arm's config as the CLI parses it, the same as the worker's, resolved (a ConfigError names the field)."""
  config = parse_config_args(["vsd_jax.train", "--config", CONFIG, *overrides])
  worker = apply_overrides(load_config_file(CONFIG), overrides, CONFIG)
  assert config.to_dict() == worker.to_dict(), "the command line and the experiment's worker build other configs"
  return resolve(config)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_experiment_arm_is_a_valid_config(arm):
  settings = check_arm(ARMS[arm])
  assert settings.method == ("vsd" if "--config.method=vsd" in ARMS[arm] else "eagle3")


@pytest.mark.parametrize("overrides, needle", [
    (["--config.method=eagle4"], "config.method='eagle4'"),
    (["--config.vsd.num_pathz=4"], "num_pathz"),
    (["--config.vsd.num_paths=four"], "vsd.num_paths"),
    (["--config.method=vsd", "--config.vsd.burn_in=99"], "config.vsd.burn_in=99"),
    (["--config.method=vsd", "--config.vsd.estep=exact", "--config.vsd.depth=8"], "config.vsd.depth=8"),
    (["--config.draft.objective=lk"], "config.draft.objective='lk'"),
])
def test_a_bad_arm_is_refused(overrides, needle):
  with pytest.raises(ConfigError, match=re.escape(needle)):
    check_arm(overrides)

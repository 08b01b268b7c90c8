"""Every arm of benchmarks/vsd_experiment.py is a valid configuration: its overrides name existing fields of
configs/vsd_experiment.py with values of their type (`cli_config.apply_overrides`, what the experiment's training
worker builds each run's config with), the TTT objective and the VSD settings pass their checks (an arm with a typo
would otherwise fail only after the minutes its predecessors took)."""

import importlib.util
import os
import re

import pytest

from vsd_jax.cli_config import ConfigError, apply_overrides, load_config_file
from vsd_jax.methods import check_method_config
from vsd_jax.methods.vsd import check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


ARMS = _module("benchmarks/vsd_experiment.py", "vsd_experiment").ARMS


def check_arm(overrides) -> None:
  """What the experiment's training worker does with an arm (`cli_config.apply_overrides` on the experiment's
  config) and the method checks train.py runs before anything loads (a ConfigError naming the field)."""
  path = os.path.join(REPO, "configs", "vsd_experiment.py")
  config = apply_overrides(load_config_file(path), overrides, path)
  check_method_config(config)   # config.method, draft.init_head, the TTT objective (the LK arms) and its settings
  if config.method == "vsd":
    check_config(config.vsd)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_experiment_arm_is_a_valid_config(arm):
  check_arm(ARMS[arm])


@pytest.mark.parametrize("overrides, error, needle", [
    (["--config.method=eagle4"], ConfigError, "config.method='eagle4'"),
    (["--config.vsd.num_pathz=4"], ConfigError, "num_pathz"),
    (["--config.vsd.num_paths=four"], ConfigError, "vsd.num_paths"),
    (["--config.method=vsd", "--config.vsd.burn_in=99"], ValueError, "config.vsd.burn_in=99"),
])
def test_a_bad_arm_is_refused(overrides, error, needle):
  with pytest.raises(error, match=re.escape(needle)):
    check_arm(overrides)

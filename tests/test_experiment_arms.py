"""Every arm of benchmarks/vsd_experiment.py is a valid configuration: its overrides name existing fields of
configs/vsd_experiment.py with values of their type (`cli_config.apply_overrides`, what the experiment's training
worker builds each run's config with), the TTT objective and the VSD settings pass their checks (an arm with a typo
would otherwise fail only after the minutes its predecessors took)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


ARMS = _module("benchmarks/vsd_experiment.py", "vsd_experiment").ARMS


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_experiment_arm_is_a_valid_config(arm):
  from vsd_jax.methods.eagle3 import ttt_loss_options
  from vsd_jax.methods.vsd import check_config
  from vsd_jax.cli_config import apply_overrides
  config = _module("configs/vsd_experiment.py", "vsd_experiment_config").get_config()
  apply_overrides(config, ARMS[arm])   # the parser the experiment's training worker applies them with
  assert config.method in ("eagle3", "vsd")
  ttt_loss_options(config)   # draft.objective (the LK arms) and its settings
  if config.method == "vsd":
    check_config(config.vsd)

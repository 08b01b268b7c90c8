"""Every arm of benchmarks/vsd_experiment.py is a valid configuration: its overrides name existing fields of
configs/vsd_experiment.py with values of their type, and the VSD ones pass the method's config checks (an arm
with a typo would otherwise fail only after the minutes its predecessors took)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _apply(config, override):
  assert override.startswith("--config."), override
  key, value = override[len("--config."):].split("=", 1)
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  assert leaf in node, f"{override}: no field {key} in configs/vsd_experiment.py"
  old = node[leaf]
  if isinstance(old, bool):
    assert value in ("True", "False"), override
    node[leaf] = value == "True"
  else:
    node[leaf] = type(old)(value)


ARMS = _module("benchmarks/vsd_experiment.py", "vsd_experiment").ARMS


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_experiment_arm_is_a_valid_config(arm):
  from vsd_jax.methods.eagle3 import ttt_loss_options
  from vsd_jax.methods.vsd import check_config
  config = _module("configs/vsd_experiment.py", "vsd_experiment_config").get_config()
  for override in ARMS[arm]:
    _apply(config, override)
  assert config.method in ("eagle3", "vsd")
  ttt_loss_options(config)   # draft.objective (the LK arms) and its settings
  if config.method == "vsd":
    check_config(config.vsd)

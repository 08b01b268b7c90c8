"""Shared fixtures. The real target (SmolLM2-135M-Instruct GGUF) loads once per test session.

Every test runs on the CPU backend with 8 host devices: the mesh tests build meshes of up to 8 devices
(explicitly, from jax.devices()[:n]); single-device code runs on device 0. XLA reads XLA_FLAGS when the
backend starts, so they are set here, before any test module imports jax. JAX_PLATFORMS=cpu is the default
(the suite's tolerances are CPU float32); set JAX_PLATFORMS yourself to run it elsewhere (the mesh tests
then need 8 devices of that platform). Subprocesses started by tests inherit both.
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {DEVICE_COUNT_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SHARED_DATA = os.environ.get(
    "VSD_DATA_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
  """The fast tier (-m "not slow") never loads the real target (~20 s, its tokenizer from the GGUF file most of
  it): a test that uses the `target` fixture is slow, marked or not."""
  for item in items:
    if "target" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def target():
  from vsd_jax.weights import load_target
  return load_target("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def data_root():
  if not os.path.isdir(SHARED_DATA):
    pytest.fail(f"shared data not found at {SHARED_DATA}; set VSD_DATA_DIR")
  return SHARED_DATA


def chat_ids(tokenizer, text):
  """Token ids of a one-turn chat prompt with the generation prompt appended."""
  return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"]

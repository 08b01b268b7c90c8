"""Shared fixtures. The real target (SmolLM2-135M-Instruct GGUF) loads once per test session."""

import os

import pytest

SHARED_DATA = os.environ.get(
    "VSD_DATA_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


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

"""Multi-device helpers. tests/conftest.py gives every pytest run 8 host CPU devices (XLA_FLAGS, set before
jax is imported), so the mesh tests run in the pytest process itself."""

import functools
import os

FLAG = "--xla_force_host_platform_device_count=8"


def subprocess_env() -> dict:
  """Environment of a test's Python subprocess: the CPU backend with 8 host devices."""
  return dict(os.environ, XLA_FLAGS=FLAG, JAX_PLATFORMS="cpu")


def needs_8_devices(fn):
  """The test needs 8 devices: it fails (never skips) with the reason when JAX has fewer."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    import jax
    assert jax.device_count() >= 8, (
        f"{fn.__name__} needs 8 devices, JAX has {jax.device_count()} ({jax.default_backend()}): run it under "
        f"pytest (tests/conftest.py sets XLA_FLAGS={FLAG} and JAX_PLATFORMS=cpu before jax starts)")
    return fn(*args, **kwargs)
  return wrapper

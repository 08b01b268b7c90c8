"""8 host CPU devices for multi-device tests. Import this module before jax in a test module.

It adds --xla_force_host_platform_device_count=8 to XLA_FLAGS. When JAX was already started with
fewer devices (another module of the same pytest run got there first), tests marked
`@needs_8_devices` run instead in one fresh pytest subprocess per module that has the 8 devices, and
each reports that run's outcome for itself.
"""

import functools
import os
import subprocess
import sys

FLAG = "--xla_force_host_platform_device_count=8"
if FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict:
  return dict(os.environ, XLA_FLAGS=FLAG, JAX_PLATFORMS="cpu")


@functools.lru_cache(maxsize=None)
def _run_module(path: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", path], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=900)


def needs_8_devices(fn):
  """Run the test here with 8 devices, else report its result from an 8-device run of its module."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    import jax
    if jax.device_count() >= 8:
      return fn(*args, **kwargs)
    path = sys.modules[fn.__module__].__file__
    r = _run_module(path)
    passed = any(line.startswith("PASSED") and line.split()[1].endswith(f"::{fn.__name__}")
                 for line in r.stdout.splitlines() if len(line.split()) > 1)
    assert passed, f"{fn.__name__} failed in the 8-device subprocess:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
  return wrapper

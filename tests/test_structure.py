"""Layout rules of the package, checked on its source: no import cycle (function-level imports included),
every mask builder in models/masks.py, training methods found by name with one `build` signature."""

import ast
import inspect
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "vsd_jax")


def package_modules() -> dict:
  """{dotted module name: path} of every module under vsd_jax/ (a package is its __init__.py)."""
  mods = {}
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        mods[".".join(rel)] = os.path.join(root, f)
  return mods


def import_graph(mods: dict) -> dict:
  """{module: set of vsd_jax modules it imports}, from every import statement in it (module level or inside
  functions). `from a.b import c` counts as importing a.b.c when that is a module, else a.b."""
  graph = {}
  for name, path in mods.items():
    is_pkg = path.endswith("__init__.py")
    edges = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = name.split(".")[:len(name.split(".")) - node.level + (1 if is_pkg else 0)]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
      else:
        continue
      edges |= {t for t in targets if t in mods and t != name}
    graph[name] = edges
  return graph


def find_cycle(graph: dict):
  """A list of modules forming a cycle, or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_cycle_finder_finds_a_hidden_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_vsd_jax():
  mods = package_modules()
  graph = import_graph(mods)
  assert "vsd_jax.methods.vsd.loss" in graph and "vsd_jax.models.masks" in graph["vsd_jax.models.llama"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_mask_builders_live_in_models_masks():
  """Every function named *_mask / *_ancestors that builds an attention mask is defined in models/masks.py."""
  outside = []
  for name, path in package_modules().items():
    if name == "vsd_jax.models.masks":
      continue
    not_attention = {"_decay_mask"}  # training/state.py: optax's weight-decay mask over parameters
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.FunctionDef) and (node.name.endswith("_mask") or node.name.endswith("ancestors")) \
          and node.name not in not_attention:
        outside.append(f"{name}.{node.name}")
  assert not outside, f"mask builders outside vsd_jax/models/masks.py: {outside}"


@pytest.mark.parametrize("name", ["eagle3", "vsd"])
def test_each_method_package_exposes_build(name):
  import importlib

  from vsd_jax.methods import METHODS
  assert name in METHODS
  build = importlib.import_module(f"vsd_jax.methods.{name}").build
  assert list(inspect.signature(build).parameters) == ["config", "target", "vocab"]

"""Layout rules of the package, checked on its source: no import cycle (function-level imports included), the
imports between data/ and decoding/ (the draft vocabulary with the models; the loop that remains listed and not
growing), every mask builder in models/masks.py, training methods found by name with one `build` signature, and
benchmarks that use only public names of vsd_jax."""

import ast
import inspect
import os
import subprocess
import sys

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
    # Importing a.b.c first runs package a.b's __init__: an edge to a.b too, unless `name` lives inside a.b
    # (then a.b is already being imported).
    edges |= {parent for t in list(edges) for parent in ancestors(t)
              if parent in mods and parent != name and not name.startswith(parent + ".")}
    graph[name] = edges
  return graph


def ancestors(module: str) -> list:
  """The packages above `module`: "a.b.c" -> ["a", "a.b"]."""
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


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


def test_import_graph_sees_package_init_edges(tmp_path):
  """`from p.q import x` inside r.s runs p/__init__.py first; a cycle through a package's __init__ is a cycle."""
  for f, text in {"p/__init__.py": "from p.q import x\n", "p/q.py": "from r.s import y\nx = 1\n",
                  "r/__init__.py": "from r.s import y\n", "r/s.py": "from p.q import x\ny = 2\n"}.items():
    (tmp_path / f).parent.mkdir(exist_ok=True)
    (tmp_path / f).write_text(text)
  mods = {m: str(tmp_path / f) for m, f in {"p": "p/__init__.py", "p.q": "p/q.py", "r": "r/__init__.py",
                                            "r.s": "r/s.py"}.items()}
  graph = import_graph(mods)
  assert "p" in graph["r.s"] and "r" in graph["p.q"]
  assert find_cycle(graph) is not None


def test_no_import_cycle_in_vsd_jax():
  mods = package_modules()
  graph = import_graph(mods)
  assert "vsd_jax.methods.vsd.loss" in graph and "vsd_jax.models.masks" in graph["vsd_jax.models.llama"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def folder_edges(graph: dict, src: str, dst: str) -> set:
  """{(module, imported module)}: the imports from vsd_jax/<src>/ into vsd_jax/<dst>/."""
  def within(m, folder):
    return m == f"vsd_jax.{folder}" or m.startswith(f"vsd_jax.{folder}.")
  return {(a, b) for a, bs in graph.items() if within(a, src) for b in bs if within(b, dst)}


def test_folder_edges_sees_function_level_imports():
  graph = {"vsd_jax.data.x": {"vsd_jax.decoding.y", "vsd_jax.data.z"}, "vsd_jax.decoding.y": set()}
  assert folder_edges(graph, "data", "decoding") == {("vsd_jax.data.x", "vsd_jax.decoding.y")}
  assert folder_edges(graph, "decoding", "data") == set()


def test_draft_vocabulary_lives_with_the_models():
  """decoding/ and methods/ map draft ids through models.draft_vocab, not through data/."""
  graph = import_graph(package_modules())
  for folder in ("decoding", "methods", "models", "weights"):
    assert not {(a, b) for a, b in folder_edges(graph, folder, "data") if b.endswith("draft_vocab")}


# The layers: decoding/ holds the jitted decoding loops and what sizes and times them; data/ uses them to regenerate
# training responses (data.regenerate runs vanilla decoding through runner.run_batches); the decoding engine
# (vsd_jax/engine.py), which also encodes prompts with data/, sits above both. So data/ -> decoding/ only.
KNOWN_DATA_TO_DECODING = {("vsd_jax.data.regenerate", "vsd_jax.decoding"),
                          ("vsd_jax.data.regenerate", "vsd_jax.decoding.runner"),
                          ("vsd_jax.data.regenerate", "vsd_jax.decoding.vanilla")}
KNOWN_DECODING_TO_DATA = set()  # the decoding engine (vsd_jax/engine.py) sits above both


def test_data_decoding_edges_are_the_known_ones():
  """No import between data/ and decoding/ beyond the known ones (a removed one must leave the list too)."""
  graph = import_graph(package_modules())
  assert folder_edges(graph, "data", "decoding") == KNOWN_DATA_TO_DECODING
  assert folder_edges(graph, "decoding", "data") == KNOWN_DECODING_TO_DATA


def test_no_data_decoding_loop():
  """data/ and decoding/ import each other in at most one direction (function-level imports included)."""
  graph = import_graph(package_modules())
  assert not (folder_edges(graph, "data", "decoding") and folder_edges(graph, "decoding", "data"))


def test_mask_builders_live_in_models_masks():
  """Every function named *_mask / *_ancestors that builds an attention mask is defined in models/masks.py."""
  outside = []
  for name, path in package_modules().items():
    if name == "vsd_jax.models.masks":
      continue
    # training/state.py: optax's weight-decay mask over parameters; data/dataset.py: the rows of the loss mask
    not_attention = {"_decay_mask", "loss_mask"}
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


def private_uses(source: str) -> list:
  """Private names (`_x`, not dunder) a script takes from vsd_jax: `from vsd_jax.m import _x`, and `m._x` for a
  vsd_jax module bound by an import."""
  tree = ast.parse(source)
  modules, found = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vsd_jax"):
      for a in node.names:
        if a.name.startswith("_") and not a.name.startswith("__"):
          found.append(f"{node.module}.{a.name}")
        modules.add(a.asname or a.name)
    elif isinstance(node, ast.Import):
      modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("vsd_jax")}
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
        and node.attr.startswith("_") and not node.attr.startswith("__"):
      found.append(f"{node.value.id}.{node.attr}")
  return found


def test_private_use_finder():
  src = "from vsd_jax.cli_config import _load, apply\nfrom vsd_jax.decoding import autotune\nautotune._states(1)\n"
  assert private_uses(src) == ["vsd_jax.cli_config._load", "autotune._states"]
  assert private_uses("from vsd_jax.decoding import autotune\nautotune.states(x._y)\n") == []


def test_benchmarks_use_only_public_names():
  bench = os.path.join(REPO, "benchmarks")
  found = {f: private_uses(open(os.path.join(bench, f)).read()) for f in sorted(os.listdir(bench)) if f.endswith(".py")}
  assert not {f: p for f, p in found.items() if p}, "benchmarks import private names of vsd_jax"


def test_cli_modules_import_without_jax():
  """The modules whose imports stay inside functions for that reason import no JAX: train.py (--dry_run sets
  XLA_FLAGS before JAX starts), dry_run, cli_config, convert_draft and the draft vocabulary dry_run reads."""
  code = ("import sys, vsd_jax.train, vsd_jax.dry_run, vsd_jax.cli_config, vsd_jax.convert_draft, "
          "vsd_jax.models.draft_vocab; print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, PYTHONPATH=REPO))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]", r.stdout

"""Config loading for the CLIs: ml_collections config files with `--config.a.b=v` overrides.

Overrides are checked against the config before absl parses them, so an unknown field is an error that
names the field, the config file, and the fields that do exist.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vsd_jax.errors import DEBUG_ENV, ConfigError, debug_requested, run_reporting  # noqa: F401 (ConfigError: here too)
# decoding.tree (and with it JAX) is imported only by the CLIs that define decoding-shape flags, so train's start-up
# stays light.


def load_config_file(path: str):
  """The config of `file.py` or `file.py:arg` (get_config(arg), as ml_collections passes it)."""
  path, *args = path.split(":", 1)
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path!r}. Pass e.g. --config configs/tiny.py")
  spec = importlib.util.spec_from_file_location("_vsd_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path!r} has no get_config() function")
  try:
    return module.get_config(*args)
  except (ValueError, TypeError, KeyError) as e:  # e.g. an unknown size in configs/vicuna.py:30b
    raise ConfigError(str(e) if path in str(e) else f"--config {':'.join([path, *args])}: {e}") from e


def _field(cfg, dotted: str, path: str):
  """(parent section, leaf name) of the dotted field in cfg; ConfigError naming it when it does not exist."""
  node, walked = cfg, []
  parts = dotted.split(".")
  for part in parts:
    if not hasattr(node, "keys") or part not in node:
      where = ".".join(walked) or "<top level>"
      known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
      raise ConfigError(f"unknown config field {dotted!r} in {path!r}: {where!r} has no field {part!r}. "
                        f"Known fields there: {known}.")
    parent, node = node, node[part]
    walked.append(part)
  return parent, parts[-1]


def check_overrides(argv) -> None:
  """Raise ConfigError for `--config.x.y=v` naming a field the config file does not have."""
  path = None
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif a.startswith("--config="):
      path = a.split("=", 1)[1]
  if path is None:
    return
  cfg = load_config_file(path)
  for a in argv:
    if a.startswith("--config."):
      _field(cfg, a[len("--config."):].split("=", 1)[0], path)


def apply_overrides(cfg, overrides, path: str = "<config>"):
  """cfg with `--config.x.y=v` overrides applied in place (for programs that build several configs in one
  process; the CLIs parse them with absl). Each value is read as the field's current type (bool: True/False;
  int, float, str; tuples and None-valued fields as Python literals); an unknown field or a value of another
  type is a ConfigError naming it. Returns cfg."""
  for a in overrides:
    if not a.startswith("--config.") or "=" not in a:
      raise ConfigError(f"{a!r} is not a --config.<field>=<value> override")
    dotted, text = a[len("--config."):].split("=", 1)
    parent, leaf = _field(cfg, dotted, path)
    old = parent[leaf]
    try:
      if isinstance(old, bool):
        if text not in ("True", "False", "true", "false"):
          raise ValueError("expected True or False")
        value = text in ("True", "true")
      elif isinstance(old, (int, float, str)):
        value = type(old)(text)
      else:
        value = ast.literal_eval(text)
      parent[leaf] = value
    except (ValueError, TypeError, SyntaxError) as e:
      raise ConfigError(f"--config.{dotted}={text!r}: not a value of the field's type "
                        f"({type(old).__name__}, now {old!r}): {e}") from None
  return cfg


def parse_config_args(argv):
  """The config a CLI builds from `argv` (["prog", "--config", "file.py", "--config.a.b=v", ...]): this module's
  override check (an unknown field: ConfigError naming it), then ml_collections' own flag parser, as the CLIs parse
  --config (a value that is not of the field's type: ConfigError). For programs and tests that need what the
  command line would give without running a CLI."""
  check_overrides(argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", flag_values=values, lock_config=True,
                                  sys_argv=list(argv))
  try:
    values(list(argv))
  except flags.Error as e:
    raise ConfigError(f"{e}; pass a value of the field's type") from None
  return values.config


def define_config_flag(name: str = "config"):
  """The --config flag (an ml_collections config file). Call at import time of a CLI module. Defined once per process:
  a second CLI module imported into the same process (tests run several) shares it."""
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return config_flags.DEFINE_config_file(name, None, "Path to a config file (configs/*.py).",
                                         lock_config=True)


def run_app(main) -> None:
  """absl app.run of a CLI's main, with the one error path for user mistakes (vsd_jax.errors): the override
  check first, so a bad field fails before absl loads anything, then `main`; a UserError from either prints
  `error: <message>` (no traceback) and exits with status 1. --debug or VSD_JAX_DEBUG=1 shows the traceback."""
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, f"Show the traceback of an input error (also: {DEBUG_ENV}=1).")
  run_reporting(check_overrides, sys.argv)
  app.run(lambda argv: run_reporting(main, argv, debug=debug_requested() or flags.FLAGS.debug))


def define_decoding_shape_flags():
  """--mode/--tree_depth/--top_k/--total_tokens (any of them given: that shape; none: the autotuned one, see
  vsd_jax.decoding.autotune), --retune and --autotune_cache. Call at import time of a CLI module."""
  from vsd_jax.decoding.tree import SHAPE_DEFAULTS
  flags.DEFINE_enum("mode", None, ("tree", "chain"), "Draft shape: tree (top-k dynamic tree) or chain. Leave "
                    "--mode/--tree_depth/--top_k/--total_tokens all unset to use the shape measured fastest on "
                    "this device for this target and draft (cached; see --retune). Others given: "
                    f"{SHAPE_DEFAULTS['mode']}.")
  flags.DEFINE_integer("tree_depth", None, f"Draft steps per round (others given: default {SHAPE_DEFAULTS['depth']}).")
  flags.DEFINE_integer("top_k", None, f"Draft tree branching (others given: default {SHAPE_DEFAULTS['top_k']}).")
  flags.DEFINE_integer("total_tokens", None, "Draft tokens verified per round in tree mode (others given: default "
                       f"{SHAPE_DEFAULTS['total_tokens']}).")
  flags.DEFINE_bool("retune", False, "Measure the decoding shape again even when the cache holds one.")
  flags.DEFINE_string("autotune_cache", None, "JSON file of measured decoding shapes (default "
                      "$VSD_JAX_CACHE or ~/.cache/vsd_jax/decoding_shapes.json; '' = do not cache).")

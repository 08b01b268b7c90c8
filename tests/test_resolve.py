"""`vsd_jax.resolved.resolve`: the config validated and derived once. Every config in configs/ resolves; the views'
values are base_config's (the one place defaults live) and no module of methods/ or training/ restates one with
`config...get(field, default)` or casts a setting in traced code; a bad value, a wrong type or a missing field is a
ConfigError naming `config.<section>.<field>`, its value, why, and the fix; the rules between fields hold; the
held-out report leaves the config as it was. No JAX, no model: this file runs in a second or two."""

import ast
import dataclasses
import glob
import math
import os
import re

import pytest

from vsd_jax.cli_config import load_config_file
from vsd_jax.config_base import base_config
from vsd_jax.errors import ConfigError
from vsd_jax.resolved import LENGTH_POLICIES, METHODS, TARGET_FEATURES, Resolved, as_resolved, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "vsd_jax")


def _config_files():
  files = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
  # configs whose get_config takes an argument: each size or stage they name in their docstrings
  return files + [os.path.join(REPO, "configs", f) for f in ("llava.py:tiny", "qwen3.py:tiny", "vicuna.py:13b",
                                                               "llama3.py:70b")]


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: os.path.basename(p))
def test_every_config_resolves(path):
  settings = resolve(load_config_file(path))
  assert isinstance(settings, Resolved) and settings.method in METHODS
  assert as_resolved(settings) is settings


def _section(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def test_defaults_come_from_base_config():
  """Each view reads every field of its section, and its values are base_config's: a default set anywhere else
  (a view's own default, a field left unread) fails here."""
  base = base_config()
  s = resolve(base)
  views = {"model": s.model, "draft": s.draft, "vsd": s.vsd, "train": s.train, "generate": s.decode,
           "data.regen": s.data.regen}
  for section, view in views.items():
    node = _section(base, section)
    names = {f.name for f in dataclasses.fields(view)}
    assert names == set(node.keys()), (section, names ^ set(node.keys()))
    for name in names:
      assert getattr(view, name) == node[name], (section, name)
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(view)), section  # no second default
  data = {f.name for f in dataclasses.fields(s.data)}
  assert data == set(base.data.keys())
  for name in data - {"sources", "regen", "buckets"}:
    assert getattr(s.data, name) == base.data[name], name
  assert s.data.buckets == tuple(base.data.buckets) and s.data.sources == base.data.sources.to_dict()
  assert (s.heldout.path, s.heldout.limit) == (base.eval.heldout_path, base.eval.heldout_limit)
  assert s.heldout.source == dict(type="eagle", path=base.eval.heldout_path, limit=base.eval.heldout_limit)
  assert (s.method, s.seed, s.workdir) == (base.method, base.seed, base.workdir)


def test_choices_agree_with_the_modules_that_act_on_them():
  """Modules outside methods/ keep their own tuple of a field's choices; it must be resolve's."""
  def literal(path, name):
    for node in ast.parse(open(os.path.join(PKG, path)).read()).body:
      if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
        return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no {name}")
  assert literal("training/feature_cache.py", "MODES") == TARGET_FEATURES
  assert literal("data/chat.py", "LENGTH_POLICIES") == LENGTH_POLICIES


BAD_VALUES = [
    ("method", "eagle4", "must be one of"),
    ("model.max_positions", 0, "must be >= 1"),
    ("draft.ttt_steps", 0, "must be >= 1"),
    ("draft.ttt_steps", 2.5, "must be an integer"),
    ("draft.objective", "tv", "must be one of ('kl', 'lk_alpha', 'lk_lambda')"),
    ("draft.lk_kl_decay", -1.0, "must be >= 0"),
    ("draft.init_head", "embedding", "must be one of ('random', 'target')"),
    ("draft.vision_adaptor", "yes", "must be True or False"),
    ("vsd.depth", 0, "must be >= 1"),
    ("vsd.depth", "four", "must be an integer"),
    ("vsd.burn_in", 8, "must be in [0, num_paths=8)"),
    ("vsd.draft_temperature", 0.0, "must be > 0"),
    ("vsd.estep", "gibbs", "must be one of ('mcmc', 'snis', 'exact')"),
    ("vsd.ema_decay", 1.0, "must be >= 0 and < 1"),
    ("vsd.eagle3_grad_share", 1.0, "must be in [0, 1)"),
    ("vsd.mu", -1.0, "must be >= 0"),
    ("vsd.arw", 1, "must be True or False"),
    ("vsd.arw_norm", "some", "must be one of ('supported', 'all')"),
    ("train.lr", -1e-3, "must be a finite number > 0"),
    ("train.lr", math.inf, "must be a finite number"),
    ("train.batch_size", 0, "must be >= 1"),
    ("train.total_steps", 50, "must exceed train.warmup_steps=100"),
    ("train.target_features", "cached", "must be one of ('in_step', 'precomputed')"),
    ("train.grad_clip", -0.5, "must be >= 0"),
    ("generate.max_new_tokens", 0, "must be >= 1"),
    ("generate.temperature", -0.5, "must be >= 0"),
    ("generate.top_p", 1.5, "must be in (0, 1]"),
    ("generate.untie_lm_head", "sometimes", "must be one of ('auto', 'true', 'false')"),
    ("data.buckets", (512, 256), "increasing positive integers"),
    ("data.length_policy", "cut", "must be one of ('truncate', 'drop')"),
    ("data.max_images", -1, "must be >= 0"),
    ("data.regen.batch_size", 0, "must be >= 1"),
    ("eval.heldout_source", "mt_bench", "must be a source spec"),
]


@pytest.mark.parametrize("field, value, why", BAD_VALUES, ids=lambda x: str(x))
def test_a_bad_value_names_the_field_the_value_why_and_the_fix(field, value, why):
  c = base_config()
  parent, leaf = field.rsplit(".", 1) if "." in field else ("", field)
  with c.ignore_type():
    (_section(c, parent) if parent else c)[leaf] = value
  with pytest.raises(ConfigError) as e:
    resolve(c)
  msg = str(e.value)
  shown = repr(float(value)) if isinstance(value, float) else repr(value)
  assert msg.startswith(f"config.{field}={shown}: "), msg
  assert why in msg, msg
  fix = msg.split("; ")[-1]
  assert "--config." in fix and field.rsplit(".", 1)[0].split(".")[0] in fix, msg


@pytest.mark.parametrize("field", ["vsd.depth", "draft.objective", "train.lr", "generate.temperature",
                                   "eval.heldout_path", "data.regen.seed"])
def test_a_missing_field_is_named_with_the_fix(field):
  c = base_config()
  parent, leaf = field.rsplit(".", 1)
  del _section(c, parent)[leaf]
  with pytest.raises(ConfigError, match=re.escape(f"config.{field} is missing") + ".*base_config"):
    resolve(c)


def _vsd(**fields):
  c = base_config()
  c.method = "vsd"
  c.vsd.update(fields)
  return c


def test_exact_vsd_depth_is_checked_against_the_ttt_length():
  """The exact objective reads the first vsd.depth steps of the TTT unroll: depth <= draft.ttt_steps."""
  c = _vsd(estep="exact", depth=7)
  assert resolve(c).vsd.depth == c.draft.ttt_steps == 7
  c.vsd.depth = 8
  with pytest.raises(ConfigError, match=re.escape("config.vsd.depth=8: must be in [1, draft.ttt_steps=7]") +
                     ".*--config.draft.ttt_steps"):
    resolve(c)
  c.draft.ttt_steps = 8
  resolve(c)
  # The sampled E-steps unroll the draft's own chain to any depth.
  assert resolve(_vsd(estep="mcmc", depth=9)).vsd.depth == 9
  tiny_vsd = resolve(load_config_file(os.path.join(REPO, "configs", "tiny_vsd.py")))
  assert tiny_vsd.vsd.depth <= tiny_vsd.draft.ttt_steps


def test_rules_between_fields():
  with pytest.raises(ConfigError, match=r"config.vsd.eagle3_grad_share=0.5: needs the EAGLE-3 term.*--config.vsd.mu"):
    resolve(_vsd(eagle3_grad_share=0.5, mu=0.0))
  with pytest.raises(ConfigError, match=r"config.vsd.eagle3_grad_share=0.5: needs exact_form='log_u'"):
    resolve(_vsd(estep="exact", exact_form="reach", eagle3_grad_share=0.5))
  resolve(_vsd(estep="exact", exact_form="log_u", eagle3_grad_share=0.5))
  c = _vsd()
  c.train.target_features = "precomputed"
  with pytest.raises(ConfigError, match=r"config.train.target_features='precomputed': serves method 'eagle3' only"):
    resolve(c)
  c.method = "eagle3"
  resolve(c)
  c = base_config()
  c.vsd.accept_temperature = 0.0  # read only with accept_mode="stochastic"
  resolve(c)
  c.vsd.accept_mode = "stochastic"
  with pytest.raises(ConfigError, match="config.vsd.accept_temperature=0.0"):
    resolve(c)


def test_views_are_frozen():
  s = resolve(base_config())
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.vsd.depth = 3
  assert s.draft.ttt_loss_options() == dict(num_steps=7, decay=0.8, objective="kl", lk_kl_scale=1.0, lk_kl_decay=1.0)


# ---- no second place for defaults, no casts of settings in traced code ---------------------------------------------
CONFIG_ROOTS = ("config", "cfg", "ev", "train_cfg", "settings")
SECTIONS = ("model", "generate", "data", "mesh", "draft", "vsd", "eval", "train")


def config_gets(source: str) -> list:
  """`<config>.<...>.get(...)` calls in source: a lookup with a default restated where the config is read."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
      receiver = ast.unparse(node.func.value)
      parts = receiver.split(".")
      if parts[0] in CONFIG_ROOTS or (len(parts) > 1 and parts[-1] in SECTIONS) or parts[0] in ("v", "d", "g"):
        found.append(ast.unparse(node))
  return found


def setting_casts(source: str) -> list:
  """int/float/bool/str casts of a settings view's field (v.depth, d.ttt_steps, config.vsd.mu, ...)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("int", "float", "bool",
                                                                                            "str") and node.args:
      arg = ast.unparse(node.args[0])
      if arg.split(".")[0] in ("v", "d", "config", "settings") and "." in arg:
        found.append(ast.unparse(node))
  return found


def test_the_finders_find():
  src = "a = config.vsd.get('mu', 1.0)\nb = v.get('arw_norm', 'supported')\nc = batch.get('pixel_values')\n" \
        "k = int(v.depth)\nn = int(ids.shape[0])\n"
  assert config_gets(src) == ["config.vsd.get('mu', 1.0)", "v.get('arw_norm', 'supported')"]
  assert setting_casts(src) == ["int(v.depth)"]


def _sources(*folders_or_files):
  for rel in folders_or_files:
    path = os.path.join(PKG, rel)
    files = glob.glob(os.path.join(path, "**", "*.py"), recursive=True) if os.path.isdir(path) else [path]
    for f in sorted(files):
      yield os.path.relpath(f, REPO), open(f).read()


def test_methods_training_and_decoding_restate_no_config_default():
  found = {f: config_gets(src) for f, src in _sources("methods", "training", "engine.py", "evaluate.py",
                                                      "generate.py", "weights/registry.py")}
  assert not {f: g for f, g in found.items() if g}, "read the field from vsd_jax.resolved's views instead"


def test_methods_cast_no_setting():
  found = {f: setting_casts(src) for f, src in _sources("methods", "training/heldout.py", "training/state.py")}
  assert not {f: g for f, g in found.items() if g}, "the views hold typed values: no casts (in traced code)"


# ---- the held-out report reads the config, never rewrites it ------------------------------------------------------
def test_heldout_config_changes_only_the_prompt_source():
  from vsd_jax.training.heldout import heldout_config
  for c in (base_config(), load_config_file(os.path.join(REPO, "configs", "llava.py:tiny"))):
    c.method, c.vsd.estep, c.vsd.lambda_car, c.vsd.mu = "vsd", "exact", 2.0, 0.5
    before = c.to_dict()
    ev = heldout_config(c)
    assert c.to_dict() == before
    after = ev.to_dict()
    assert after["data"].pop("sources") == dict(heldout=resolve(c).heldout.source)
    before["data"].pop("sources")
    assert after == before
  assert resolve(c).heldout.source["type"] == "llava"  # configs/llava.py's own held-out source


def test_heldout_module_assigns_no_method_setting():
  tree = ast.parse(open(os.path.join(PKG, "training", "heldout.py")).read())
  targets = [ast.unparse(t) for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets]
  assert not [t for t in targets if any(f".{s}." in t for s in ("vsd", "draft", "train", "method"))], targets

"""The config, validated and derived once: `resolve(config) -> Resolved`, frozen typed views of what each part reads.

ml_collections files (configs/*.py, `--config.a.b=v` overrides) stay the user's format; every default lives in
`vsd_jax.config_base.base_config`, which every config starts from. `resolve` reads each field the parts below read,
checks its type and range (and the rules between fields), and returns plain frozen dataclasses:

    Resolved.draft    DraftSettings   the draft and its training-time-test (TTT) loss      (config.draft)
    Resolved.vsd      VsdSettings     VSD's EM settings                                      (config.vsd)
    Resolved.train    TrainSettings   the optimiser and the training loop                    (config.train)
    Resolved.decode   DecodeSettings  generation defaults of generate / evaluate              (config.generate)
    Resolved.data     DataSettings    training data, with RegenSettings (config.data.regen)  (config.data)
    Resolved.heldout  HeldoutSettings the held-out report's prompt source                    (config.eval)
    Resolved.model    ModelSettings   the target's name and dtypes                           (config.model)

A missing field, a value of the wrong type or one out of range is a ConfigError naming `config.<section>.<field>`,
its value, why it cannot be used and the fix. Methods, the trainer and jitted code read these views (plain Python
numbers and strings: no casts or lookups inside traced code). This module imports no JAX: the CLIs resolve a config
before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from vsd_jax.config_base import base_config
from vsd_jax.errors import ConfigError

# The choices of the fields that name one; the modules that act on them import these.
METHODS = ("eagle3", "vsd")                            # config.method
INIT_HEADS = ("random", "target")                      # config.draft.init_head
OBJECTIVES = ("kl", "lk_alpha", "lk_lambda")           # config.draft.objective: the TTT loss's per-step objective
ACCEPT_MODES = ("greedy", "stochastic")                # config.vsd.accept_mode
UTILITIES = ("expected_length", "full_accept")         # config.vsd.utility
SAMPLED_ESTEPS = ("mcmc", "snis")                      # config.vsd.estep over sampled proposals
ESTEPS = SAMPLED_ESTEPS + ("exact",)                   # config.vsd.estep
EXACT_FORMS = ("log_u", "reach")                       # config.vsd.exact_form
ARW_NORMS = ("supported", "all")                       # config.vsd.arw_norm
TARGET_FEATURES = ("in_step", "precomputed")           # config.train.target_features
LENGTH_POLICIES = ("truncate", "drop")                 # config.data.length_policy
BAD_LINE_POLICIES = ("error", "skip")                  # config.data.on_bad_line
UNTIE_SETTINGS = ("auto", "true", "false")             # config.generate.untie_lm_head

_FROM_BASE = "configs start from vsd_jax.config_base.base_config(), which sets every field; build the config from it"


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  name: str               # registry name, GGUF path, HF directory or hub id
  dtype: str              # compute dtype
  param_dtype: str        # storage dtype of the target's params
  max_positions: int      # cache/positions bound of generation and training sequences


@dataclasses.dataclass(frozen=True)
class DraftSettings:
  ttt_steps: int          # training-time-test unroll length
  step_decay: float       # step k weighs step_decay**k
  objective: str          # OBJECTIVES
  lk_kl_scale: float      # lk_lambda's KL weight w = lk_kl_scale * exp(-lk_kl_decay * acceptance)
  lk_kl_decay: float
  init_from: str          # a trained draft directory to start from; "" = random init
  init_head: str          # INIT_HEADS
  vision_adaptor: bool    # ViSpec-style vision adaptor (multimodal targets)
  vision_queries: int     # the adaptor's learned queries

  def ttt_loss_options(self) -> dict:
    """`methods.eagle3.loss.eagle3_loss`'s static settings: every caller of the TTT loss reads them here."""
    return dict(num_steps=self.ttt_steps, decay=self.step_decay, objective=self.objective,
                lk_kl_scale=self.lk_kl_scale, lk_kl_decay=self.lk_kl_decay)


@dataclasses.dataclass(frozen=True)
class VsdSettings:
  depth: int                # K: tokens per draft path
  num_paths: int            # S: proposals per anchor
  num_anchors: int          # M: anchors per sequence
  draft_temperature: float  # q's sampling temperature for the proposals
  accept_mode: str          # ACCEPT_MODES
  accept_temperature: float # T of p^T in stochastic mode
  utility: str              # UTILITIES
  estep: str                # ESTEPS
  exact_form: str           # EXACT_FORMS (estep "exact")
  lambda_exact: float       # weight of -J (estep "exact", form "log_u")
  burn_in: int              # chain states dropped (mcmc)
  arw: bool                 # Adaptive Rejection Weighting; False = plain EM likelihood
  eta: float                # unlikelihood strength
  eta_max: float
  ema_decay: float          # EMA of the per-depth acceptance c_k
  rho0: float               # weight of never-verified tokens
  rho: float
  gamma: float              # depth discount of the ARW terms
  lambda_car: float         # Confidence-Aware Regularization weight (0 disables)
  car_beta: float
  mu: float                 # weight of EAGLE-3's TTT loss
  eagle3_grad_share: float  # > 0: the EAGLE-3 term keeps this share of the gradient norm
  arw_norm: str             # ARW_NORMS


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  batch_size: int
  target_features: str      # TARGET_FEATURES
  lr: float
  warmup_steps: int
  total_steps: int
  end_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip: float          # 0 disables
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoint: bool
  resume: bool
  resume_fallback: bool
  progress_bar: bool


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  max_new_tokens: int
  temperature: float        # 0 = greedy
  top_p: float
  batch_size: int
  system_prompt: str        # "" keeps the chat template's default
  scan_layers: bool
  untie_lm_head: str        # UNTIE_SETTINGS


@dataclasses.dataclass(frozen=True)
class RegenSettings:
  max_new_tokens: int
  temperature: float
  top_p: float
  batch_size: int
  seed: int


@dataclasses.dataclass(frozen=True)
class DataSettings:
  root: str
  sources: dict             # name -> source spec (plain dicts), as config.data.sources
  on_bad_line: str          # BAD_LINE_POLICIES
  system_prompt: str
  chat_template: str
  enable_thinking: bool
  max_length: int
  length_policy: str        # LENGTH_POLICIES
  buckets: tuple            # padded training lengths, increasing
  cache_dir: str            # "" = <workdir>/data_cache
  draft_vocab_size: int
  max_images: int           # images per row of a multimodal dataset; 0 = the most one prompt has
  regen: RegenSettings


@dataclasses.dataclass(frozen=True)
class HeldoutSettings:
  path: str                 # EAGLE question.jsonl under data.root
  limit: int                # -1 = all
  source: dict              # the source spec the report reads: config.eval.heldout_source, else EAGLE's file


@dataclasses.dataclass(frozen=True)
class Resolved:
  """What every part of a run reads, checked and derived from one config (see the module docstring)."""
  method: str
  seed: int
  workdir: str
  model: ModelSettings
  draft: DraftSettings
  vsd: VsdSettings
  train: TrainSettings
  decode: DecodeSettings
  data: DataSettings
  heldout: HeldoutSettings


# ------------------------------------------------------------------ reading fields
def _bad(name: str, value: Any, why: str, fix: str):
  raise ConfigError(f"config.{name}={value!r}: {why}; {fix}")


class _Section:
  """Typed reads of one config section; every error names config.<section>.<field>, the value and the fix."""

  def __init__(self, config, name: str):
    self.name = name
    node = config
    for part in name.split(".") if name else []:
      if not hasattr(node, "keys") or part not in node:
        raise ConfigError(f"config.{name} is missing: {_FROM_BASE}")
      node = node[part]
    self.node = node

  def path(self, field: str) -> str:
    return f"{self.name}.{field}" if self.name else field

  def example(self, field: str) -> str:
    """The fix's example value: base_config's default."""
    node = base_config()
    for part in self.path(field).split("."):
      node = node[part]
    return f"set e.g. --config.{self.path(field)}={node!r} (the default)"

  def raw(self, field: str):
    if field not in self.node:
      raise ConfigError(f"config.{self.path(field)} is missing: {_FROM_BASE}")
    return self.node[field]

  def bad(self, field: str, value, why: str, fix: Optional[str] = None):
    _bad(self.path(field), value, why, fix or self.example(field))

  def integer(self, field: str, low: Optional[int] = None, why: str = "") -> int:
    v = self.raw(field)
    if isinstance(v, bool) or not isinstance(v, int):
      self.bad(field, v, f"must be an integer, not {type(v).__name__}")
    if low is not None and v < low:
      self.bad(field, v, why or f"must be >= {low}")
    return int(v)

  def number(self, field: str, low: Optional[float] = None, strict: bool = False, high: Optional[float] = None,
             high_open: bool = True, why: str = "") -> float:
    v = self.raw(field)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      self.bad(field, v, f"must be a number, not {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
      self.bad(field, v, "must be a finite number")
    below = low is not None and (v <= low if strict else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if below or above:
      lo = "" if low is None else f"{'>' if strict else '>='} {low:g}"
      hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
      self.bad(field, v, why or f"must be {' and '.join(s for s in (lo, hi) if s)}")
    return v

  def flag(self, field: str) -> bool:
    v = self.raw(field)
    if not isinstance(v, bool):
      self.bad(field, v, f"must be True or False, not {type(v).__name__}")
    return v

  def text(self, field: str, choices: Optional[tuple] = None) -> str:
    v = self.raw(field)
    if not isinstance(v, str):
      self.bad(field, v, f"must be a string, not {type(v).__name__}")
    if choices is not None and v not in choices:
      self.bad(field, v, f"must be one of {choices}", f"set e.g. --config.{self.path(field)}={choices[0]}")
    return v


def _plain(value):
  """A ConfigDict / FrozenConfigDict subtree as plain dicts (what source specs are read as)."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


# ------------------------------------------------------------------ the views
def _model(config) -> ModelSettings:
  s = _Section(config, "model")
  return ModelSettings(name=s.text("name"), dtype=s.text("dtype"), param_dtype=s.text("param_dtype"),
                       max_positions=s.integer("max_positions", 1))


def _draft(config) -> DraftSettings:
  s = _Section(config, "draft")
  return DraftSettings(
      ttt_steps=s.integer("ttt_steps", 1), step_decay=s.number("step_decay", 0.0),
      objective=s.text("objective", OBJECTIVES),
      lk_kl_scale=s.number("lk_kl_scale", 0.0, why="must be >= 0 (the KL weight is lk_kl_scale * exp(-lk_kl_decay * "
                          "acceptance))"),
      lk_kl_decay=s.number("lk_kl_decay", 0.0, why="must be >= 0 (the KL weight is lk_kl_scale * exp(-lk_kl_decay * "
                          "acceptance))"),
      init_from=s.text("init_from"), init_head=s.text("init_head", INIT_HEADS),
      vision_adaptor=s.flag("vision_adaptor"), vision_queries=s.integer("vision_queries", 1))


def _vsd(config) -> VsdSettings:
  s = _Section(config, "vsd")
  num_paths = s.integer("num_paths", 1)
  burn_in = s.integer("burn_in", 0)
  if burn_in >= num_paths:
    s.bad("burn_in", burn_in, f"must be in [0, num_paths={num_paths}) (the chain keeps the states after it)",
          f"set --config.vsd.burn_in to at most {num_paths - 1}, or raise --config.vsd.num_paths")
  accept_mode = s.text("accept_mode", ACCEPT_MODES)
  mu = s.number("mu", 0.0)
  share = s.number("eagle3_grad_share", 0.0, high=1.0, why="must be in [0, 1) (0: off)")
  if share > 0 and mu <= 0:
    s.bad("eagle3_grad_share", share, "needs the EAGLE-3 term (mu > 0) whose share of the gradient norm it holds",
          "set --config.vsd.mu=1.0, or --config.vsd.eagle3_grad_share=0.0")
  return VsdSettings(
      depth=s.integer("depth", 1), num_paths=num_paths, num_anchors=s.integer("num_anchors", 1),
      draft_temperature=s.number("draft_temperature", 0.0, strict=True,
                                why="must be > 0 (the E-step samples proposals from q)"),
      accept_mode=accept_mode,
      accept_temperature=(s.number("accept_temperature", 0.0, strict=True,
                                  why="must be > 0 with accept_mode='stochastic'") if accept_mode == "stochastic"
                          else s.number("accept_temperature")),
      utility=s.text("utility", UTILITIES), estep=s.text("estep", ESTEPS), exact_form=s.text("exact_form", EXACT_FORMS),
      lambda_exact=s.number("lambda_exact", 0.0), burn_in=burn_in, arw=s.flag("arw"),
      eta=s.number("eta", 0.0), eta_max=s.number("eta_max", 0.0),
      ema_decay=s.number("ema_decay", 0.0, high=1.0), rho0=s.number("rho0", 0.0), rho=s.number("rho", 0.0),
      gamma=s.number("gamma", 0.0), lambda_car=s.number("lambda_car", 0.0), car_beta=s.number("car_beta", 0.0),
      mu=mu, eagle3_grad_share=share, arw_norm=s.text("arw_norm", ARW_NORMS))


def _train(config) -> TrainSettings:
  s = _Section(config, "train")
  lr = s.number("lr", 0.0, strict=True, why="the learning rate must be a finite number > 0 (a negative one trains "
               "away from the data)")
  warmup, total = s.integer("warmup_steps", 0), s.integer("total_steps", 1)
  if total <= warmup:
    s.bad("total_steps", total, f"must exceed train.warmup_steps={warmup}",
          "lower --config.train.warmup_steps or raise --config.train.total_steps")
  return TrainSettings(
      batch_size=s.integer("batch_size", 1, why="must be >= 1 sequences per step"),
      target_features=s.text("target_features", TARGET_FEATURES), lr=lr, warmup_steps=warmup, total_steps=total,
      end_lr_ratio=s.number("end_lr_ratio", 0.0), weight_decay=s.number("weight_decay", 0.0),
      b1=s.number("b1", 0.0, high=1.0), b2=s.number("b2", 0.0, high=1.0), eps=s.number("eps", 0.0, strict=True),
      grad_clip=s.number("grad_clip", 0.0, why="must be >= 0 (0 disables clipping)"),
      log_every=s.integer("log_every", 1), checkpoint_every=s.integer("checkpoint_every", 1),
      keep_checkpoints=s.integer("keep_checkpoints", 1), async_checkpoint=s.flag("async_checkpoint"),
      resume=s.flag("resume"), resume_fallback=s.flag("resume_fallback"), progress_bar=s.flag("progress_bar"))


def _decode(config) -> DecodeSettings:
  s = _Section(config, "generate")
  untie = s.raw("untie_lm_head")
  if isinstance(untie, bool):  # True / False given as a bool mean "true" / "false"
    untie = str(untie).lower()
  elif not isinstance(untie, str) or untie.lower() not in UNTIE_SETTINGS:
    s.bad("untie_lm_head", untie, f"must be one of {UNTIE_SETTINGS} ('auto': untied on CPUs only)")
  return DecodeSettings(
      max_new_tokens=s.integer("max_new_tokens", 1), temperature=s.number("temperature", 0.0, why="must be >= 0 "
                                                                      "(0 = greedy)"),
      top_p=s.number("top_p", 0.0, strict=True, high=1.0, high_open=False, why="must be in (0, 1] (1 = no nucleus "
                    "cut)"),
      batch_size=s.integer("batch_size", 1), system_prompt=s.text("system_prompt"), scan_layers=s.flag("scan_layers"),
      untie_lm_head=untie.lower())


def _regen(config) -> RegenSettings:
  s = _Section(config, "data.regen")
  return RegenSettings(max_new_tokens=s.integer("max_new_tokens", 1), temperature=s.number("temperature", 0.0),
                       top_p=s.number("top_p", 0.0, strict=True, high=1.0, high_open=False),
                       batch_size=s.integer("batch_size", 1), seed=s.integer("seed"))


def _data(config) -> DataSettings:
  s = _Section(config, "data")
  buckets = s.raw("buckets")
  if not isinstance(buckets, (tuple, list)) or not buckets or any(
      isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets) or list(buckets) != sorted(
          set(buckets)):
    s.bad("buckets", buckets, "must be a non-empty tuple of increasing positive integers (padded training lengths)")
  sources = s.raw("sources")
  if not hasattr(sources, "keys"):
    s.bad("sources", sources, "must map source names to source specs")
  return DataSettings(
      root=s.text("root"), sources=_plain(sources), on_bad_line=s.text("on_bad_line", BAD_LINE_POLICIES),
      system_prompt=s.text("system_prompt"), chat_template=s.text("chat_template"),
      enable_thinking=s.flag("enable_thinking"), max_length=s.integer("max_length", 1),
      length_policy=s.text("length_policy", LENGTH_POLICIES), buckets=tuple(int(b) for b in buckets),
      cache_dir=s.text("cache_dir"), draft_vocab_size=s.integer("draft_vocab_size", 1),
      max_images=s.integer("max_images", 0), regen=_regen(config))


def _heldout(config) -> HeldoutSettings:
  s = _Section(config, "eval")
  path, limit = s.text("heldout_path"), s.integer("heldout_limit")
  source = s.raw("heldout_source")
  if source is not None and not hasattr(source, "keys"):
    s.bad("heldout_source", source, "must be a source spec (a dict with type=..., as in config.data.sources) or "
          "None (EAGLE's question.jsonl at eval.heldout_path)")
  source = _plain(source) if source else dict(type="eagle", path=path, limit=limit)
  return HeldoutSettings(path=path, limit=limit, source=source)


def resolve(config) -> Resolved:
  """config (a ConfigDict built from base_config, overrides applied) -> Resolved; a ConfigError names the first
  field that cannot be used, its value and the fix. Also the rules between fields:
    - vsd.estep="exact" runs on the first vsd.depth steps of the TTT unroll: vsd.depth <= draft.ttt_steps;
    - vsd.eagle3_grad_share > 0 with estep="exact" needs exact_form="log_u";
    - train.target_features="precomputed" serves method "eagle3" only."""
  top = _Section(config, "")
  method = top.text("method", METHODS)
  out = Resolved(method=method, seed=top.integer("seed"), workdir=top.text("workdir"), model=_model(config),
                 draft=_draft(config), vsd=_vsd(config), train=_train(config), decode=_decode(config),
                 data=_data(config), heldout=_heldout(config))
  v, d = out.vsd, out.draft
  if v.estep == "exact":
    if v.depth > d.ttt_steps:
      _bad("vsd.depth", v.depth, f"must be in [1, draft.ttt_steps={d.ttt_steps}] with vsd.estep='exact' (the exact "
           "objective runs on the first vsd.depth steps of the TTT unroll)",
           f"set --config.vsd.depth to at most {d.ttt_steps}, or raise --config.draft.ttt_steps")
    if v.eagle3_grad_share > 0 and v.exact_form != "log_u":
      _bad("vsd.eagle3_grad_share", v.eagle3_grad_share, "needs exact_form='log_u' with vsd.estep='exact' (it holds "
           "the EAGLE-3 term's share of the gradient against -J's)",
           "set --config.vsd.exact_form=log_u, or --config.vsd.eagle3_grad_share=0.0")
  if out.train.target_features == "precomputed" and method != "eagle3":
    _bad("train.target_features", "precomputed", f"serves method 'eagle3' only; method {method!r} needs the "
         "target's KV cache in the step", "set --config.train.target_features=in_step")
  return out


def as_resolved(config) -> Resolved:
  """`config` if it is already Resolved, else resolve(config): library entry points accept either."""
  return config if isinstance(config, Resolved) else resolve(config)

"""The decoding engine: everything around the jitted decoding loops, once, for the CLIs and the benchmarks.

    engine = Engine(config, draft_dir)                 # target (decoding layout) + draft, prompt encoder
    encoded = engine.encode(items, source)             # chat template, images
    engine.check_capacity(encoded.ids, max_new_tokens, names)
    engine.resolve_shape(candidates, n, batch=...)     # the shape: the user's, else measured (autotune)
    spec = engine.speculative(encoded, Sampling(...))  # or engine.vanilla(...): Generations, timed, with acceptance

Shapes: a shape the user gives (`explicit_shape`; missing fields from `tree.SHAPE_DEFAULTS`, the one table) is used
as given. Otherwise the shape is the one measured fastest on this device (`autotune.choose_shape`), calibrated on
text prompts the run does not score; when there are none (every prompt scored, or image prompts only) the
calibration uses the text prompts shipped for it (`PACKAGED_CALIBRATION`) and says so. No shape is ever used
unmeasured. `Choice.pays` tells whether the measured shape beats vanilla decoding here (`speculating`).
Cache slots: `runner.cache_slots`, the one rounding of cache sizes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vsd_jax import parallel
from vsd_jax.data.chat import prompt_encoder
from vsd_jax.data.prompt_file import encode_prompt_items, read_prompt_file
from vsd_jax.decoding import autotune, speculative, vanilla
from vsd_jax.decoding.precision import matmul_precision
from vsd_jax.decoding.runner import cache_slots, check_capacity, run_batches
from vsd_jax.decoding.tree import SHAPE_DEFAULTS, TreeConfig
from vsd_jax.errors import UserError
from vsd_jax.models.eagle3 import Eagle3Draft
from vsd_jax.models.features import image_inputs
from vsd_jax.resolved import as_resolved
from vsd_jax.weights import decoding_load_options, load_target
from vsd_jax.weights.draft_io import load_draft

PACKAGED_CALIBRATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                    "calibration_prompts.jsonl")
PACKAGED_AT_LEAST = 8  # packaged prompts used however few the run would have taken of its own


def explicit_shape(depth=None, top_k=None, total_tokens=None, mode=None) -> Optional[TreeConfig]:
  """The shape a user gave (fields left out from SHAPE_DEFAULTS; a chain verifies `depth` tokens), or None when
  none was given: then `Engine.resolve_shape` measures one."""
  given = dict(depth=depth, top_k=top_k, total_tokens=total_tokens, mode=mode)
  if all(v is None for v in given.values()):
    return None
  v = {k: SHAPE_DEFAULTS[k] if x is None else x for k, x in given.items()}
  if v["mode"] == "chain":
    v.update(top_k=1, total_tokens=v["depth"])
  return TreeConfig(**v)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to decode: new tokens per prompt, temperature (0 = greedy), nucleus mass, prompts per batch, seed.
  Out-of-range values are a UserError naming the flag and the range."""
  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  batch_size: int = 1
  seed: int = 0

  def __post_init__(self):
    check_decoding_values(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                          batch_size=self.batch_size)


def check_decoding_values(**values) -> None:
  """Raise UserError for the first value out of range, naming its flag: max_new_tokens / batch_size / num_prompts /
  calib_prompts >= 1 (integers), temperature >= 0 and finite, 0 < top_p <= 1. None values are skipped."""
  for name, v in values.items():
    if v is None:
      continue
    if name == "temperature":
      ok, want = isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)"
    elif name == "top_p":
      ok, want = isinstance(v, (int, float)) and 0 < v <= 1, "in (0, 1] (1 = no nucleus cut)"
    else:
      ok, want = isinstance(v, (int, np.integer)) and v >= 1, "an integer >= 1"
    if not ok:
      raise UserError(f"--{name}={v} is out of range: it must be {want}; pass e.g. --{name}="
                       f"{dict(temperature=0, top_p=1.0).get(name, 1)}")


@dataclasses.dataclass
class CalibrationPrompts:
  """Token-id prompts whose greedy continuations measure the draft's acceptance, and where they came from."""
  ids: list
  source: str        # "user" (prompts of the run that it does not score) or "packaged" (PACKAGED_CALIBRATION)
  names: list        # question ids (or line indices) of the prompts
  origin: str = ""   # the file(s) they were read from

  def describe(self) -> dict:
    return dict(source=self.source, origin=self.origin, question_ids=list(self.names))


@dataclasses.dataclass
class LoadedDraft:
  model: object   # Eagle3Draft
  params: object
  d2t: jax.Array  # int32 [Vd]
  path: str


def load_decoding_target(config, name: Optional[str] = None):
  """The target of config.model in the decoding layout (unrolled layers; an untied vocabulary projection on CPUs),
  straight into its shardings on config.mesh's fsdp x tensor devices (parallel.decode_mesh)."""
  return load_target(name or config.model.name, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                     mesh=parallel.decode_mesh(config), rules=parallel.logical_axis_rules(config),
                     **decoding_load_options(config))


def load_decoding_draft(draft_dir: str, target) -> LoadedDraft:
  dcfg, params, d2t, _ = load_draft(draft_dir, target.config)
  return LoadedDraft(Eagle3Draft(dcfg), params, jnp.asarray(d2t), draft_dir)


class Engine:
  """A target, its prompt encoder and an optional draft, decoding prompts vanilla or speculatively.

  config: the user's config (model, generate, data.chat_template), a ConfigDict (generation settings read through
  `vsd_jax.resolved.resolve`: Engine.decode). draft_dir: a trained draft directory (None:
  vanilla only). shape: a TreeConfig the user fixed (None: measured by `resolve_shape`). precision: matmul
  precision of target and draft ('highest' for T=0 output identical to vanilla on GPUs). target: an already loaded
  target (shared between engines, e.g. `with_draft`).
  """

  def __init__(self, config, draft_dir: Optional[str] = None, shape: Optional[TreeConfig] = None, *,
               precision: Optional[str] = None, target=None, log: Optional[Callable] = None):
    self.config, self.precision, self.shape, self.user_shape = config, precision, shape, shape is not None
    settings = as_resolved(config)
    self.decode = settings.decode  # config.generate: system prompt (and the CLIs' sampling defaults)
    self.log = log or (lambda msg: print(msg, file=sys.stderr))
    self.target = target if target is not None else load_decoding_target(config)
    self.encoder = prompt_encoder(self.target, config)  # config.data.chat_template, end-of-turn and pad ids
    self.max_positions = min(settings.model.max_positions, self.target.config.max_position_embeddings)
    self.draft = load_decoding_draft(draft_dir, self.target) if draft_dir else None
    self.choice: Optional[autotune.Choice] = None
    self.calibration: Optional[CalibrationPrompts] = None

  def with_draft(self, draft_dir: str, shape: Optional[TreeConfig] = None) -> "Engine":
    """Another engine on the same loaded target, with this draft and shape."""
    return Engine(self.config, draft_dir, shape, precision=self.precision, target=self.target, log=self.log)

  def with_shape(self, shape: TreeConfig) -> "Engine":
    """This engine (same target and draft) with a shape fixed by the caller."""
    other = copy.copy(self)
    other.shape, other.user_shape, other.choice, other.calibration = shape, True, None, None
    return other

  # ---- prompts -------------------------------------------------------------------------------------------------

  def encode(self, items, source: str):
    """(id, user message[, image files]) items -> data.prompt_file.EncodedPrompts (chat template with
    config.generate.system_prompt; a LLaVA target's image tokens expanded). source names the prompts in errors."""
    return encode_prompt_items(self.target, self.encoder, items, self.decode.system_prompt, source)

  def check_capacity(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     names: Optional[Sequence[str]] = None, speculative_too: Optional[bool] = None) -> None:
    """Every prompt fits the model with max_new_tokens (and, when it is decoded speculatively too -- default: when
    `speculating` --, a round's tree and draft scratch); else PromptTooLongError naming the prompt."""
    spec = self.speculating if speculative_too is None else speculative_too
    extra = speculative.required_slots(0, 0, self.shape) if spec and self.shape is not None else 0
    for i, p in enumerate(prompts):
      check_capacity([len(p)], max_new_tokens, self.max_positions, extra=extra,
                     names=None if names is None else [names[i]])

  # ---- the shape -----------------------------------------------------------------------------------------------

  def calibration_prompts(self, candidates: Sequence[tuple], n: int, origin: str = "") -> CalibrationPrompts:
    """The one calibration policy: the first n text prompts of `candidates` ((id, message[, images]) items the run
    does not score); when there is none, the first max(n, PACKAGED_AT_LEAST) of the prompts shipped for
    calibration."""
    text = [it for it in candidates if not (len(it) > 2 and it[2])][:n]
    source = "user"
    if not text:
      text = read_prompt_file(PACKAGED_CALIBRATION)[:max(n, PACKAGED_AT_LEAST)]
      source, origin = "packaged", PACKAGED_CALIBRATION
    system = self.decode.system_prompt
    return CalibrationPrompts([self.encoder.encode_user(it[1], system) for it in text], source,
                              [it[0] for it in text], origin)

  def resolve_shape(self, candidates: Sequence[tuple] = (), n: int = 4, *, origin: str = "", batch: int = 1,
                    cache_path: Optional[str] = None, retune: bool = False) -> Optional[TreeConfig]:
    """The decoding shape: the user's when given, else the one measured fastest here (autotune.choose_shape, cached)
    with `calibration_prompts(candidates, n, origin)`; batch: the decoding batch size the costs are timed at."""
    if self.draft is None or self.user_shape:
      return self.shape
    self.calibration = self.calibration_prompts(candidates, n, origin)
    if self.calibration.source == "packaged":
      self.log(f"autotune: no text prompt of {origin or 'the input'} is left to calibrate on (every prompt is "
               f"decoded, or they have images); the calibration uses {len(self.calibration.ids)} prompts shipped for "
               f"it ({PACKAGED_CALIBRATION}) unless this device's choice is cached")
    d = self.draft
    self.choice = autotune.choose_shape(
        self.target, d.model, d.params, d.d2t, d.path, self.calibration.ids, eos_ids=self.encoder.eos_ids,
        pad_id=self.encoder.pad_id, batch=batch, precision=self.precision, cache_path=cache_path, retune=retune,
        calibration=self.calibration.describe(), log=self.log)
    self.log(self.choice.describe())
    self.shape = self.choice.shape
    return self.shape

  @property
  def speculating(self) -> bool:
    """A draft and a shape, and the shape is the user's or predicted faster than vanilla here (`Choice.pays`)."""
    return self.draft is not None and self.shape is not None and (self.choice is None or self.choice.pays)

  def metadata(self) -> dict:
    """What decoded: the draft, the shape and where it came from (the user, or autotune with its calibration)."""
    choice = self.choice
    return dict(
        draft=None if self.draft is None else self.draft.path,
        tree=None if self.shape is None else dataclasses.asdict(self.shape),
        shape_source="user" if self.user_shape else ("autotune" if choice is not None else None),
        speculating=self.speculating, precision=self.precision,
        autotune=None if choice is None else dict(cached=choice.cached, key=choice.key, table=choice.table,
                                                  predicted_speedup=choice.predicted_speedup),
        calibration=None if choice is None else dict(
            self.calibration.describe(), measured_with=choice.calibration if choice.cached else None),
        jax=jax.__version__, device=str(jax.devices()[0]))

  # ---- decoding ------------------------------------------------------------------------------------------------

  def vanilla(self, prompts, sampling: Sampling, *, on_batch: Optional[Callable] = None,
              progress: Optional[Callable] = None) -> list:
    """Decode `prompts` (token-id lists, or EncodedPrompts with images) with the target alone.
    -> runner.Generation per prompt (wall_time: its batch's seconds, compilation excluded; rounds: target
    forwards after prefill). on_batch(indices, generations) runs after each batch."""
    t = self.target
    enc = self.encoder

    def call(ids, lens, rows=None):
      o = vanilla.generate(t.model, t.params, jnp.asarray(ids), jnp.asarray(lens), jax.random.PRNGKey(sampling.seed),
                           sampling.temperature, max_new_tokens=sampling.max_new_tokens,
                           cache_slots=cache_slots(ids.shape[1], sampling.max_new_tokens,
                                                   max_positions=self.max_positions),
                           eos_ids=enc.eos_ids, top_p=sampling.top_p, pad_id=enc.pad_id, precision=self.precision,
                           pixel_values=self.pixel_values(prompts, rows))
      return o.tokens, o.num_new, o.rounds
    return self._run(prompts, sampling, call, on_batch, progress)

  def speculative(self, prompts, sampling: Sampling, *, on_batch: Optional[Callable] = None,
                  progress: Optional[Callable] = None) -> list:
    """As `vanilla`, with the draft and the resolved shape; Generation.accept_hist counts rounds by accepted
    drafts. Lossless: at T=0 the tokens are vanilla's."""
    if self.draft is None or self.shape is None:
      raise ValueError("speculative decoding needs a draft and a shape: Engine(config, draft_dir) and, unless a "
                       "shape was given, resolve_shape() first")
    t, d, enc, shape = self.target, self.draft, self.encoder, self.shape

    def call(ids, lens, rows=None):
      o = speculative.speculative_generate(
          t.model, t.params, d.model, d.params, d.d2t, jnp.asarray(ids), jnp.asarray(lens),
          jax.random.PRNGKey(sampling.seed), tree_cfg=shape, max_new_tokens=sampling.max_new_tokens,
          cache_slots=cache_slots(ids.shape[1], sampling.max_new_tokens, speculative.required_slots(0, 0, shape)),
          eos_ids=enc.eos_ids, temperature=sampling.temperature, top_p=sampling.top_p, pad_id=enc.pad_id,
          precision=self.precision, pixel_values=self.pixel_values(prompts, rows))
      return o.tokens, o.num_new, o.rounds, o.accept_hist
    return self._run(prompts, sampling, call, on_batch, progress)

  def generate(self, prompts, sampling: Sampling, **kwargs) -> list:
    """Speculative when `speculating`, else vanilla."""
    return (self.speculative if self.speculating else self.vanilla)(prompts, sampling, **kwargs)

  def _run(self, prompts, sampling, call, on_batch, progress):
    ids, images = (prompts.ids, prompts.images) if hasattr(prompts, "ids") else (prompts, None)
    return run_batches(ids, sampling.batch_size, call, self.encoder.pad_id, progress=progress, extras=images,
                       on_batch=on_batch)

  @staticmethod
  def pixel_values(prompts, rows):
    """The images of `rows` (run_batches' extras: image files per row) of EncodedPrompts, or None for text."""
    return None if rows is None else jnp.asarray(prompts.pixel_values(rows))

  def t0_mismatches(self, prompts, names, vanilla_out, speculative_out) -> list:
    """For each prompt whose outputs differ: its name, and the target's logit gap where they first differ."""
    images = prompts.images if hasattr(prompts, "images") else None
    ids = prompts.ids if hasattr(prompts, "ids") else prompts
    return [dict(question_id=names[i], **self.logit_gap(ids[i], v.output_ids, s.output_ids, self.pixel_values(
        prompts, None if images is None else [images[i]])))
            for i, (v, s) in enumerate(zip(vanilla_out, speculative_out)) if v.output_ids != s.output_ids]

  def logit_gap(self, prompt_ids, a, b, pixel_values=None) -> dict:
    """The target's logit gap (top1 - top2) at the first position where outputs a and b differ.
    pixel_values: a multimodal prompt's images [1, I, C, S, S] (LLaVA)."""
    i = next(k for k in range(min(len(a), len(b)) + 1) if k == min(len(a), len(b)) or a[k] != b[k])
    seq = jnp.asarray([list(prompt_ids) + list(a[:i])], jnp.int32)
    with matmul_precision(self.precision):
      logits = np.asarray(self.target.model.apply({"params": self.target.params}, seq,
                                                  **image_inputs(dict(pixel_values=pixel_values))).logits[0, -1])
    top2 = np.sort(logits)[-2:]
    return dict(position=i, gap=float(top2[1] - top2[0]))

"""Response regeneration: the target answers every prompt itself (self-distillation, as EAGLE-3 does).

Responses are cached in a JSONL file per (model, generation settings, chat template), one line per
prompt keyed by a hash of its token ids, appended after every chunk of batches: a rerun reuses what is
there and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from vsd_jax.decoding.runner import run_batches

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenSettings:
  max_new_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0


def content_hash(*parts) -> str:
  """sha256 (hex, 16 chars) of JSON-serialisable parts."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prompt_key(prompt_ids: Sequence[int], images: Sequence[str] = ()) -> str:
  """Cache key of a prompt: its token ids and, for a multimodal prompt, its images (file name and size each)."""
  h = hashlib.sha256(np.asarray(prompt_ids, np.int32).tobytes())
  if images:
    from vsd_jax.data.images import image_identity
    h.update(json.dumps([image_identity(p) for p in images]).encode())
  return h.hexdigest()[:24]


def cache_path(cache_dir: str, model_id: str, settings: GenSettings, template: str) -> str:
  """Response cache file for a model (source path/name + dtypes), generation settings and chat template."""
  key = content_hash(model_id, dataclasses.asdict(settings), template)
  return os.path.join(cache_dir, f"responses-{key}.jsonl")


def read_cache(path: str) -> dict:
  """{prompt key: response ids} from a cache file; a torn last line (interrupted write) is skipped."""
  out = {}
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      try:
        rec = json.loads(line)
        out[rec["key"]] = rec["response"]
      except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("response cache %s:%d is unreadable (interrupted write?); that prompt will be regenerated",
                    path, n)
  return out


def repair_torn_tail(path: str) -> None:
  """Make the cache file end with a whole line before anything is appended to it.

  A write cut off mid-line (a killed run) leaves a last line without its newline: appended as it is, the next
  record would join it and both would be lost. A torn line that still parses (only its newline missing) gets the
  newline; one that does not is cut off (its prompt is regenerated), with one warning naming the file, so later
  reads are clean."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    start = data.rfind(b"\n") + 1
    try:
      rec = json.loads(data[start:].decode("utf-8"))
      whole = isinstance(rec, dict) and "key" in rec and "response" in rec
    except (UnicodeDecodeError, json.JSONDecodeError):
      whole = False
    if whole:
      f.write(b"\n")
    else:
      f.truncate(start)
      log.warning("response cache %s: its last line was cut off (an interrupted write; %d bytes); removed it, so "
                  "its prompt is regenerated and new records append cleanly", path, len(data) - start)


def make_target_call(target, settings: GenSettings, max_positions: int, eos_ids: Sequence[int],
                     pad_id: int, pixels=None) -> Callable:
  """`call(ids [B,P], lens [B][, images]) -> (tokens [B,N], num_new [B], rounds [B])` running vanilla.generate.

  run_batches calls each new shape twice (compile, then timed); the repeat of an identical batch is
  answered from memory, so no batch is generated twice. Each generated batch gets its own PRNG key.
  pixels: a data.images.PixelLoader for multimodal prompts: `images` (each row's image files, run_batches'
  extras) become pixel_values [B, I, C, S, S] of the prefill.
  """
  import jax
  import jax.numpy as jnp

  from vsd_jax.decoding.runner import check_capacity
  from vsd_jax.decoding.vanilla import generate

  state = {"n": 0, "last": None}
  base = jax.random.PRNGKey(settings.seed)

  def call(ids, lens, images=None):
    key = (ids.tobytes(), lens.tobytes(), repr(images))
    if state["last"] is not None and state["last"][0] == key:
      return state["last"][1]
    slots = check_capacity(lens, settings.max_new_tokens, max_positions)
    px = None if images is None else jnp.asarray(pixels.batch(images))
    out = generate(target.model, target.params, jnp.asarray(ids), jnp.asarray(lens),
                   jax.random.fold_in(base, state["n"]), settings.temperature,
                   max_new_tokens=settings.max_new_tokens, cache_slots=slots, eos_ids=tuple(eos_ids),
                   top_p=settings.top_p, pad_id=pad_id, pixel_values=px)
    result = jax.device_get((out.tokens, out.num_new, out.rounds))
    state["n"] += 1
    state["last"] = (key, result)
    return result

  return call


def regenerate(prompts: Sequence[Sequence[int]], call: Callable, path: str, batch_size: int, pad_id: int,
               chunk_batches: int = 8, progress: bool = True, images: Optional[Sequence] = None) -> list:
  """Responses (list of token ids, EOS included when produced) for each prompt, from the cache at `path`
  or generated with `call` (see make_target_call) in batches; new results are appended to `path`.

  Prompts are generated in length order, in chunks of chunk_batches * batch_size, each saved when done.
  images: per prompt its image files (multimodal prompts); they key the cache with the ids and are passed to
  `call(ids, lens, images)`.
  """
  from tqdm import tqdm

  keys = [prompt_key(p, images[i] if images is not None else ()) for i, p in enumerate(prompts)]
  repair_torn_tail(path)  # before reading: a repaired file reads without a warning, now and later
  cached = read_cache(path)
  todo = sorted({k: i for i, k in enumerate(keys) if k not in cached}.values(), key=lambda i: len(prompts[i]))
  log.info("regenerate: %d prompts, %d cached in %s, %d to generate", len(prompts), len(prompts) - len(todo),
           path, len(todo))
  if todo:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    step = max(1, chunk_batches) * batch_size
    with tqdm(total=len(todo), desc="regenerate responses", file=sys.stderr, disable=not progress) as bar, \
        open(path, "a", encoding="utf-8") as f:
      for start in range(0, len(todo), step):
        idx = todo[start:start + step]
        results = run_batches([prompts[i] for i in idx], batch_size, call, pad_id, progress=bar.update,
                              extras=None if images is None else [images[i] for i in idx])
        for i, r in zip(idx, results):
          cached[keys[i]] = r.output_ids
          f.write(json.dumps({"key": keys[i], "response": r.output_ids}) + "\n")
        f.flush()
  return [list(cached[k]) for k in keys]

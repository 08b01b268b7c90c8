"""Response regeneration: the target answers every prompt itself (self-distillation, as EAGLE-3 does).

Responses are cached in a JSONL file per (model, generation settings, chat template), one line per
prompt keyed by a hash of its token ids, appended and flushed after every batch: a rerun reuses what is
there and an interrupted run resumes where it stopped.

Several processes (a pod, a multi-host job) split the prompts: each prompt belongs to one process (a stable hash
of its key modulo the process count, `shard_owner`), which generates it and appends it to its own shard of the
cache, `responses-<key>.<p>-of-<n>.jsonl`; after a barrier every process reads every shard. The reader merges any
layout (the unsharded file and shards of any process count), so a cache written by one process serves many and
the reverse; the cache directory must be shared by all processes.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from vsd_jax.decoding.runner import run_batches
from vsd_jax.errors import UserError

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


class RegenerationError(UserError):
  """Responses missing after every process finished its share (a process failed, or the cache directory is not
  shared by all of them)."""


def shard_owner(key: str, process_count: int) -> int:
  """The process (0..process_count-1) that generates the prompt with cache key `key`: a hash of the key, the same
  on every host and in every run."""
  return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % max(1, process_count)


def shard_path(path: str, process_index: int, process_count: int) -> str:
  """The file process `process_index` of `process_count` appends to: `path` itself for one process, else
  `<path without .jsonl>.<p>-of-<n>.jsonl`."""
  if process_count <= 1:
    return path
  base = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
  return f"{base}.{process_index}-of-{process_count}.jsonl"


def cache_files(path: str) -> list:
  """Every existing file of the cache at `path`: the unsharded file and the shards of any process count."""
  base = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
  shards = sorted(glob.glob(glob.escape(base) + ".*-of-*.jsonl"))
  return ([path] if os.path.exists(path) else []) + shards


def read_cache(path: str, warn: bool = True) -> dict:
  """{prompt key: response ids} from a cache file; a torn last line (interrupted write) is skipped (with a warning
  unless warn=False)."""
  out = {}
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      try:
        rec = json.loads(line)
        out[rec["key"]] = rec["response"]
      except (json.JSONDecodeError, KeyError, TypeError):
        if warn:
          log.warning("response cache %s:%d is unreadable (interrupted write?); that prompt will be regenerated",
                      path, n)
  return out


def read_cache_set(path: str, quiet: Sequence[str] = ()) -> dict:
  """{prompt key: response ids} merged from every file of the cache at `path` (cache_files). Files in `quiet`
  (shards other processes may be writing now) are read without warnings about a torn line."""
  out = {}
  for f in cache_files(path):
    out.update(read_cache(f, warn=f not in quiet))
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
               progress: bool = True, images: Optional[Sequence] = None, process_index: int = 0,
               process_count: int = 1, barrier: Optional[Callable] = None) -> list:
  """Responses (list of token ids, EOS included when produced) for each prompt, from the cache at `path`
  or generated with `call` (see make_target_call) in batches; new results are appended to the cache.

  Prompts are generated in length order; each batch is appended and fsynced when done, so a killed run loses
  at most the batch in flight.
  images: per prompt its image files (multimodal prompts); they key the cache with the ids and are passed to
  `call(ids, lens, images)`.
  process_index / process_count: this process generates only the prompts it owns (shard_owner) that no file of
  the cache holds, into its shard (shard_path); then `barrier()` (default parallel.process_barrier) waits for
  every process, and the responses of all prompts are read from all shards. A prompt still missing then is a
  RegenerationError naming its owner's shard.
  """
  from tqdm import tqdm

  keys = [prompt_key(p, images[i] if images is not None else ()) for i, p in enumerate(prompts)]
  own = shard_path(path, process_index, process_count)
  repair_torn_tail(own)  # before reading: a repaired file reads without a warning, now and later
  others = [f for f in cache_files(path) if f != own]
  cached = read_cache_set(path, quiet=others if process_count > 1 else ())
  todo = sorted({k: i for i, k in enumerate(keys)
                 if k not in cached and shard_owner(k, process_count) == process_index}.values(),
                key=lambda i: len(prompts[i]))
  log.info("regenerate: %d prompts, %d cached in %s, %d to generate%s", len(prompts),
           sum(k in cached for k in keys), path, len(todo),
           f" (process {process_index} of {process_count}, into {own})" if process_count > 1 else "")
  if todo:
    os.makedirs(os.path.dirname(os.path.abspath(own)), exist_ok=True)
    with tqdm(total=len(todo), desc="regenerate responses", file=sys.stderr, disable=not progress) as bar, \
        open(own, "a", encoding="utf-8") as f:

      def save(idx, generations):  # run_batches' indices are positions in `todo`
        for j, g in zip(idx, generations):
          cached[keys[todo[j]]] = g.output_ids
          f.write(json.dumps({"key": keys[todo[j]], "response": g.output_ids}) + "\n")
        f.flush()
        os.fsync(f.fileno())  # a finished batch survives a machine crash, not only a killed process

      run_batches([prompts[i] for i in todo], batch_size, call, pad_id, progress=bar.update,
                  extras=None if images is None else [images[i] for i in todo], on_batch=save)
  if process_count > 1:
    if barrier is None:
      from vsd_jax import parallel
      barrier = lambda: parallel.process_barrier("regenerate")  # noqa: E731
    barrier()
    cached = read_cache_set(path)
  missing = {}
  for k in dict.fromkeys(keys):
    if k not in cached:
      missing.setdefault(shard_owner(k, process_count), []).append(k)
  if missing:
    where = "; ".join(f"process {p}: {len(ks)} in {shard_path(path, p, process_count)}"
                      f"{'' if os.path.exists(shard_path(path, p, process_count)) else ' (no such file)'}"
                      for p, ks in sorted(missing.items()))
    raise RegenerationError(
        f"{sum(map(len, missing.values()))} of {len(set(keys))} responses are missing after every process finished "
        f"regenerating ({where}). Did a process fail? data.cache_dir must be one directory shared by every "
        "process (a shared filesystem on a pod); rerun to generate only the missing ones.")
  return [list(cached[k]) for k in keys]

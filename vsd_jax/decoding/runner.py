"""Host-side driver: pad prompts into length buckets, call the jitted loop, time it, unpad results."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from vsd_jax.errors import UserError


class PromptTooLongError(UserError):
  """A prompt that cannot fit the model's positions with the tokens asked for; the message names it."""


def bucket(n: int, multiple: int = 64) -> int:
  """Round up to a multiple, so that nearby lengths share one compiled program."""
  return max(multiple, -(-n // multiple) * multiple)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 64):
  """-> (int32 [B, P] right-padded, int32 [B] lengths). Empty prompts are an error."""
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
  lens = np.array([len(p) for p in prompts], np.int32)
  ids = np.full((len(prompts), bucket(int(lens.max()), multiple)), pad_id, np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  return ids, lens


def check_capacity(prompt_lens, max_new_tokens: int, max_positions: int, extra: int = 0,
                   names: Optional[Sequence[str]] = None, multiple: int = 64) -> int:
  """Cache slots for a batch; raises PromptTooLongError naming the prompt that cannot fit the model.

  The slots count the padded prompt width (`pad_prompts` with this `multiple`), not the longest prompt, so
  every batch of one padded shape gets the same slots and so one compiled program: `run_batches` compiles
  once per shape, and a second program for the same shape would be compiled inside its timed call.
  """
  longest = int(np.max(prompt_lens))
  need = longest + max_new_tokens + extra
  if need > max_positions:
    i = int(np.argmax(prompt_lens))
    label = names[i] if names is not None else f"prompt {i}"
    # Fewer new tokens help only while the prompt (and the draft's slots) leave room for at least one.
    fix = ("Shorten the prompt or lower --max_new_tokens" if longest + extra + 1 <= max_positions else
           "Shorten the prompt or raise --config.model.max_positions (up to the model's own limit): no "
           "--max_new_tokens leaves room for it")
    raise PromptTooLongError(
        f"{label} has {int(prompt_lens[i])} tokens; with max_new_tokens={max_new_tokens}"
        f"{f' and {extra} draft slots' if extra else ''} it needs {need} positions but the model/cache "
        f"allows {max_positions}. {fix}.")
  return cache_slots(bucket(longest, multiple), max_new_tokens, extra, max_positions)


def cache_slots(prompt_width: int, max_new_tokens: int, extra: int = 0, max_positions: Optional[int] = None) -> int:
  """KV-cache slots for prompts padded to prompt_width, max_new_tokens new tokens and `extra` slots (a speculative
  round's tree and draft scratch: speculative.required_slots(0, 0, shape)), capped at max_positions when given,
  rounded up to a multiple of 128 (the one rounding of cache sizes, so nearby sizes share a compiled program)."""
  need = prompt_width + max_new_tokens + extra
  return bucket(need if max_positions is None else min(need, max_positions), 128)


@dataclasses.dataclass
class Generation:
  prompt_ids: list
  output_ids: list
  new_tokens: int
  rounds: int
  wall_time: float
  accept_hist: Optional[list] = None  # speculative decoding: rounds that accepted m = 0..D draft tokens


def run_batches(prompts: Sequence[Sequence[int]], batch_size: int, call: Callable, pad_id: int,
                progress: Optional[Callable] = None, extras: Optional[Sequence] = None,
                on_batch: Optional[Callable] = None) -> list:
  """Run `call(ids, lens) -> (tokens, num_new, rounds[, accept_hist])` over batches sorted by length.

  Each batch is called once to compile (not timed) and once timed, so wall_time excludes compilation.
  Returns a Generation per prompt, in the input order. The batch's wall time is given to each row.
  extras: one entry per prompt (e.g. a multimodal prompt's image files); then `call(ids, lens, batch_extras)`
  with the batch rows' entries, as a list in row order. on_batch(indices, generations): after each batch, with
  its prompts' input indices and Generations (e.g. to write them out as they finish).
  """
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  results: list = [None] * len(prompts)
  compiled = set()
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    batch = [prompts[i] for i in idx]
    while len(batch) < batch_size:  # keep the batch shape static: repeat the last prompt
      batch.append(batch[-1])
    ids, lens = pad_prompts(batch, pad_id)
    args = (ids, lens)
    if extras is not None:
      args += ([extras[i] for i in idx] + [extras[idx[-1]]] * (batch_size - len(idx)),)
    key = ids.shape
    if key not in compiled:
      jax.block_until_ready(call(*args))
      compiled.add(key)
    t0 = time.perf_counter()
    out = jax.device_get(jax.block_until_ready(call(*args)))
    dt = time.perf_counter() - t0
    tokens, num_new, rounds = out[:3]
    for row, i in enumerate(idx):
      n = int(num_new[row])
      hist = out[3][row].tolist() if len(out) > 3 else None
      results[i] = Generation(list(prompts[i]), tokens[row, :n].tolist(), n, int(rounds[row]), dt, hist)
    if on_batch is not None:
      on_batch(idx, [results[i] for i in idx])
    if progress is not None:
      progress(len(idx))
  return results

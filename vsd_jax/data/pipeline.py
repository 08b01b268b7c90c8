"""config.data -> training data: prompts -> chat template -> target responses (cached) -> sequences with
loss masks (length limit applied) -> draft vocabulary. Every dropped or cut item is counted and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Optional

from vsd_jax.data.chat import apply_length_limit, build_sequence, prompt_encoder
from vsd_jax.data.dataset import SequenceDataset
from vsd_jax.data.draft_vocab import DraftVocab, build_draft_vocab
from vsd_jax.data.regenerate import GenSettings, cache_path, make_target_call, regenerate
from vsd_jax.data.sources import load_prompts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingData:
  dataset: SequenceDataset
  draft_vocab: Optional[DraftVocab]  # None when prepared with draft_vocab=False (held-out data)
  stats: dict           # counts of every stage (prompts per source, dropped, truncated, unfinished, ...)
  response_cache: str   # path of the regenerated-response cache


def data_cache_dir(config) -> str:
  """config.data.cache_dir, or <workdir>/data_cache when empty."""
  return config.data.cache_dir or os.path.join(config.workdir, "data_cache")


def gen_settings(data_cfg) -> GenSettings:
  r = data_cfg.regen
  return GenSettings(max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature), top_p=float(r.top_p),
                     seed=int(r.seed))


def model_id(target) -> str:
  """What identifies the target's outputs in cache keys: its weights (file or folder name and byte sizes, not
  where they are installed, so a cache made on another machine is found) and dtypes."""
  return f"{weights_identity(target.source)}|{target.config.dtype}|{target.config.param_dtype}"


def weights_identity(source: str) -> str:
  """A GGUF file -> "name:bytes"; an HF folder -> "folder:" + its weight files' names and sizes; else source."""
  if os.path.isfile(source):
    return f"{os.path.basename(source)}:{os.path.getsize(source)}"
  if os.path.isdir(source):
    files = sorted(f for f in os.listdir(source) if f.endswith((".safetensors", ".bin", ".gguf", "config.json")))
    return os.path.basename(os.path.normpath(source)) + ":" + ",".join(
        f"{f}:{os.path.getsize(os.path.join(source, f))}" for f in files)
  return source


def prepare_data(config, target, call: Optional[Callable] = None, progress: bool = True,
                 draft_vocab: bool = True) -> TrainingData:
  """Build (or reuse from cache) the training sequences and draft vocab described by config.data.

  target: a loaded Target (tokenizer, model, params). call: override of the generation call (tests);
  default make_target_call (vanilla.generate through run_batches). draft_vocab=False skips building a draft
  vocabulary (held-out data is scored with the training run's).
  """
  d = config.data
  enc = prompt_encoder(target, config)
  prompts, source_stats = load_prompts(d, d.system_prompt)
  prompt_ids = [enc.encode(p.messages) for p in prompts]

  settings = gen_settings(d)
  max_pos = min(config.model.max_positions, target.config.max_position_embeddings)
  room = min(d.max_length - 1, max_pos - settings.max_new_tokens)
  if room < 1:
    raise ValueError(f"data.regen.max_new_tokens={settings.max_new_tokens} leaves no room for a prompt within "
                     f"{max_pos} positions (model.max_positions); lower it.")
  keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= room]
  too_long = [prompts[i].id for i in range(len(prompts)) if len(prompt_ids[i]) > room]
  if too_long:
    log.warning("%d prompts longer than %d tokens dropped (no room for a response within data.max_length=%d and "
                "model.max_positions=%d with data.regen.max_new_tokens=%d), e.g. %s", len(too_long), room,
                d.max_length, max_pos, settings.max_new_tokens, ", ".join(too_long[:3]))

  pad_id, eos = enc.pad_id, enc.eos_ids
  path = cache_path(data_cache_dir(config), model_id(target), settings, enc.template_text)
  if call is None:
    call = make_target_call(target, settings, max_pos, eos, pad_id)
  responses = regenerate([prompt_ids[i] for i in keep], call, path, int(d.regen.batch_size), pad_id,
                         progress=progress)
  unfinished = sum(1 for r in responses if not r or r[-1] not in eos)
  if unfinished:
    log.warning("%d of %d responses reached data.regen.max_new_tokens=%d without an end-of-turn token; kept as "
                "generated (no end token appended)", unfinished, len(responses), settings.max_new_tokens)

  pairs = [build_sequence(prompt_ids[i], r) for i, r in zip(keep, responses)]
  pairs, length_stats = apply_length_limit(pairs, int(d.max_length), d.length_policy)
  if not pairs:
    raise ValueError("no training sequence is left after the length limit; raise data.max_length or use "
                     "data.length_policy='truncate'.")
  dataset = SequenceDataset.from_pairs(pairs)
  vocab = None
  if draft_vocab:
    vocab = build_draft_vocab(dataset, target.config.vocab_size, int(d.draft_vocab_size), data_cache_dir(config))
  stats = dict(sources={k: dataclasses.asdict(s) for k, s in source_stats.items()}, prompts=len(prompts),
               prompt_too_long=len(too_long), unfinished=unfinished, length=dataclasses.asdict(length_stats),
               sequences=len(dataset), loss_tokens=dataset.num_loss_tokens(),
               draft_vocab_coverage=None if vocab is None else vocab.coverage)
  log.info("training data: %d sequences, %d response tokens%s", len(dataset), stats["loss_tokens"],
           "" if vocab is None else f", draft vocab coverage {100 * vocab.coverage:.2f}%")
  return TrainingData(dataset, vocab, stats, path)

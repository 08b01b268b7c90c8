"""config.data -> training data: prompts -> chat template -> target responses (cached) -> sequences with
loss masks (length limit applied), written once to a sequence store in the data cache (data.sequence_store; the
dataset reads from it) -> draft vocabulary. Every dropped or cut item is counted and logged.

Conversations whose responses come from elsewhere (a "conversations" source, `Prompt.answered`) skip
regeneration: each is rendered with the target's chat template as it is, every assistant turn in the loss mask
(chat.encode_conversation), and goes through the same length limit as the regenerated sequences.

Prompts with images (LLaVA-Instruct sources, a LLaVA target): the chat template renders each `<image>` as the
target's one image token, which is expanded to the model's image-token count (images.expand_image_tokens, what
the processor does to text); the target regenerates the response from the multimodal prefill (pixel values by
the checkpoint's own processor, data.images.PixelLoader); the sequences keep their image files, and batches made
with TrainingData.pixels carry pixel_values. The loss mask is 0 on the whole prompt, image tokens included.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Optional

from vsd_jax.data.chat import (ChatTemplateError, apply_length_limit, build_sequence, encode_conversation,
                               prompt_encoder)
from vsd_jax.data.dataset import SequenceDataset
from vsd_jax.data.images import multimodal_prompts
from vsd_jax.data.regenerate import GenSettings, cache_path, make_target_call, regenerate
from vsd_jax.data.sequence_store import store_sequences
from vsd_jax.data.sources import load_prompts
from vsd_jax.models.draft_vocab import DraftVocab, build_draft_vocab
from vsd_jax.resolved import RegenSettings, as_resolved, resolve
from vsd_jax.weights.identity import model_id
from vsd_jax.weights.local import process_local_target

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingData:
  dataset: SequenceDataset
  draft_vocab: Optional[DraftVocab]  # None when prepared with draft_vocab=False (held-out data)
  stats: dict           # counts of every stage (prompts per source, dropped, truncated, unfinished, ...)
  response_cache: str   # path of the regenerated-response cache
  pixels: Optional[object] = None  # data.images.PixelLoader of a multimodal dataset: pass to iterate_batches


def data_cache_dir(config) -> str:
  """config.data.cache_dir, or <workdir>/data_cache when empty (config: a ConfigDict or its resolved views)."""
  run = as_resolved(config)
  return run.data.cache_dir or os.path.join(run.workdir, "data_cache")


def gen_settings(regen: RegenSettings) -> GenSettings:
  return GenSettings(max_new_tokens=regen.max_new_tokens, temperature=regen.temperature, top_p=regen.top_p,
                     seed=regen.seed)


def prepare_data(config, target, call: Optional[Callable] = None, progress: bool = True,
                 draft_vocab: bool = True) -> TrainingData:
  """Build (or reuse from cache) the training sequences and draft vocab described by config.data.

  target: a loaded Target (tokenizer, model, params). call: override of the generation call (tests);
  default make_target_call (vanilla.generate through run_batches). draft_vocab=False skips building a draft
  vocabulary (held-out data is scored with the training run's).
  With several processes each generates its share of the prompts (data.regenerate) with the target on its own
  devices (weights.local.process_local_target), then all read the whole response cache.
  """
  run = resolve(config)  # the ConfigDict itself still goes to what reads other sections (the template, the mesh)
  d = run.data
  enc = prompt_encoder(target, config)
  prompts, source_stats = load_prompts(d, d.system_prompt)
  answered = [p for p in prompts if p.answered]
  prompts = [p for p in prompts if not p.answered]
  prompt_ids = [enc.encode(p.messages) for p in prompts]
  images, pixels = None, None
  if any(p.images for p in prompts):
    prompt_ids, images, pixels = multimodal_prompts(target, prompts, prompt_ids, d.max_images)

  settings = gen_settings(d.regen)
  max_pos = min(run.model.max_positions, target.config.max_position_embeddings)
  room = min(d.max_length - 1, max_pos - settings.max_new_tokens)
  if room < 1 and prompts:  # (conversations with their responses need no room for new tokens)
    raise ValueError(f"data.regen.max_new_tokens={settings.max_new_tokens} leaves no room for a prompt within "
                     f"{max_pos} positions (model.max_positions); lower it.")
  keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= room]
  too_long = [prompts[i].id for i in range(len(prompts)) if len(prompt_ids[i]) > room]
  if too_long:
    log.warning("%d prompts longer than %d tokens dropped (no room for a response within data.max_length=%d and "
                "model.max_positions=%d with data.regen.max_new_tokens=%d), e.g. %s", len(too_long), room,
                d.max_length, max_pos, settings.max_new_tokens, ", ".join(too_long[:3]))

  pad_id, eos = enc.pad_id, enc.eos_ids
  path = cache_path(data_cache_dir(run), model_id(target), settings, enc.template_text)
  import jax
  count = jax.process_count()
  if call is None:  # made when the first batch is generated: nothing is loaded when every response is cached
    call = deferred(lambda: make_target_call(process_local_target(target, config), settings, max_pos, eos, pad_id,
                                             pixels))
  responses = regenerate([prompt_ids[i] for i in keep], call, path, d.regen.batch_size, pad_id,
                         progress=progress, images=None if images is None else [images[i] for i in keep],
                         process_index=jax.process_index(), process_count=count)
  unfinished = sum(1 for r in responses if not r or r[-1] not in eos)
  if unfinished:
    log.warning("%d of %d responses reached data.regen.max_new_tokens=%d without an end-of-turn token; kept as "
                "generated (no end token appended)", unfinished, len(responses), settings.max_new_tokens)

  # A response holding the image token (a LLaVA target may sample it: it is an ordinary row of the vocabulary)
  # would be read as an image position with no image behind it; such sequences are dropped and counted.
  image_token = getattr(target.config, "image_token_id", None)
  with_image_token = set() if image_token is None else {n for n, r in enumerate(responses) if image_token in r}
  if with_image_token:
    log.warning("%d of %d responses contain the image token (id %d); those sequences are dropped",
                len(with_image_token), len(responses), image_token)
  pairs = [build_sequence(prompt_ids[i], r) + ((images[i],) if images is not None else ())
           for n, (i, r) in enumerate(zip(keep, responses)) if n not in with_image_token]
  pairs += [conversation_sequence(enc, p) + (((),) if images is not None else ()) for p in answered]
  pairs, length_stats = apply_length_limit(pairs, d.max_length, d.length_policy)
  if not pairs:
    raise ValueError("no training sequence is left after the length limit; raise data.max_length or use "
                     "data.length_policy='truncate'.")
  dataset = store_sequences(data_cache_dir(run), pairs)  # on disk once, read by every process
  del pairs
  vocab = None
  if draft_vocab:
    vocab = build_draft_vocab(dataset, target.config.vocab_size, d.draft_vocab_size, data_cache_dir(run))
  stats = dict(sources={k: dataclasses.asdict(s) for k, s in source_stats.items()},
               prompts=len(prompts) + len(answered), answered=len(answered),
               prompt_too_long=len(too_long), unfinished=unfinished, length=dataclasses.asdict(length_stats),
               response_with_image_token=len(with_image_token),
               sequences=len(dataset), loss_tokens=dataset.num_loss_tokens(),
               draft_vocab_coverage=None if vocab is None else vocab.coverage)
  log.info("training data: %d sequences, %d response tokens%s", len(dataset), stats["loss_tokens"],
           "" if vocab is None else f", draft vocab coverage {100 * vocab.coverage:.2f}%")
  return TrainingData(dataset, vocab, stats, path, pixels)


def deferred(make: Callable) -> Callable:
  """A call that runs `make()` on its first use and forwards every call to what it returned."""
  made = []

  def call(*args):
    if not made:
      made.append(make())
    return made[0](*args)

  return call


def conversation_sequence(enc, prompt) -> tuple:
  """An answered Prompt (a whole conversation) -> (input_ids [T], loss_mask [T]) under the encoder's template, the
  mask on every assistant turn; a ChatTemplateError names the conversation."""
  try:
    return encode_conversation(enc.tokenizer, prompt.messages, enc.chat_template, enc.eos_ids, enc.template_kwargs)
  except ChatTemplateError as e:
    raise ChatTemplateError(f"conversation {prompt.id}: {e}") from e

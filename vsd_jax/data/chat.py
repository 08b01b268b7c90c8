"""Chat templates and loss masks: prompt + assistant response -> (input_ids [T], loss_mask [T]); and
`prompt_encoder(target, config)`, the one prompt encoding (template, end-of-turn ids, pad id) of every caller.

The loss mask is 1 exactly on the assistant response tokens, including the end-of-turn token that closes
the response (`<|im_end|>` for ChatML/SmolLM2, `<|eot_id|>` for LLaMA-3, `</s>` for Vicuna), and 0 on the
system/user turns and the template tokens around them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import numpy as np

from vsd_jax.errors import UserError

log = logging.getLogger(__name__)

# Vicuna v1.1 conversation format, for tokenizers that ship no chat template (lmsys/vicuna-*-v1.3).
VICUNA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% set turns = messages[1:] %}{% else %}A chat between a curious user and an artificial intelligence "
    "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
    "{% set turns = messages %}{% endif %}{% for m in turns %}{% if m['role'] == 'user' %}"
    "{{ ' USER: ' + m['content'] }}{% else %}{{ ' ASSISTANT: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}")
# LLaVA-1.5 talks in Vicuna v1.1's format (LLaVA's conv_vicuna_v1: "USER: <image>\n... ASSISTANT: ...</s>").
NAMED_TEMPLATES = {"vicuna": VICUNA_TEMPLATE, "llava": VICUNA_TEMPLATE}
# Tokens that close an assistant turn in common templates (looked up in the tokenizer's vocabulary).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>")

LENGTH_POLICIES = ("truncate", "drop")


class ChatTemplateError(UserError):
  pass


def resolve_template(tokenizer, chat_template: str = "") -> Optional[str]:
  """The Jinja template to use: "" = the tokenizer's own, a name in NAMED_TEMPLATES, or a Jinja string."""
  if chat_template:
    return NAMED_TEMPLATES.get(chat_template, chat_template)
  if not getattr(tokenizer, "chat_template", None):
    raise ChatTemplateError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set --config.data.chat_template "
        f"to one of {', '.join(NAMED_TEMPLATES)} or to a Jinja template string.")
  return None  # apply_chat_template uses the tokenizer's own


def template_text(tokenizer, chat_template: str = "", template_kwargs: tuple = ()) -> str:
  """The template text in use, and the template switches passed to it (part of the regeneration cache key)."""
  text = resolve_template(tokenizer, chat_template) or tokenizer.chat_template
  return text + (f"\n{dict(template_kwargs)!r}" if template_kwargs else "")


def template_switches(tokenizer, chat_template: str, enable_thinking: bool) -> tuple:
  """((name, value), ...) of the switches this template reads: Qwen3's `enable_thinking` when the template mentions
  it (config.data.enable_thinking), none for the others (their prompts and cache keys stay as they were)."""
  text = resolve_template(tokenizer, chat_template) or tokenizer.chat_template
  return (("enable_thinking", bool(enable_thinking)),) if "enable_thinking" in text else ()


def _apply(tokenizer, messages, chat_template: str, add_generation_prompt: bool, template_kwargs: tuple = ()) -> list:
  template = resolve_template(tokenizer, chat_template)
  out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=True,
                                      chat_template=template, **dict(template_kwargs))
  return list(out["input_ids"])


def encode_prompt(tokenizer, messages: Sequence[dict], chat_template: str = "", template_kwargs: tuple = ()) -> list:
  """Token ids of the conversation so far plus the assistant header (generation prompt); template_kwargs:
  `template_switches`."""
  return _apply(tokenizer, list(messages), chat_template, add_generation_prompt=True, template_kwargs=template_kwargs)


def end_of_turn_ids(tokenizer, extra: Sequence[int] = ()) -> tuple:
  """Ids that end an assistant turn: the tokenizer's EOS, known end-of-turn tokens present, and `extra`."""
  ids = set(int(i) for i in extra)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  vocab = tokenizer.get_vocab()
  ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
  return tuple(sorted(ids))


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
  """How prompts become token ids for one target under one config, and the ids decoding needs.

  The one encoding shared by the data pipeline (regeneration, held-out report), generate, evaluate and the
  benchmarks, so a prompt is the same ids everywhere and decoding stops on the same tokens.

  tokenizer: the target's tokenizer. chat_template: config.data.chat_template ("" = the tokenizer's own, a
  NAMED_TEMPLATES name or a Jinja string). template_kwargs: the switches passed to the template
  (`template_switches`: Qwen3's enable_thinking from config.data.enable_thinking). eos_ids: ids that end a
  response (end_of_turn_ids: the tokenizer's EOS, known end-of-turn tokens in its vocabulary and the model config's
  eos ids). pad_id: the tokenizer's pad id, else 0.
  """
  tokenizer: Any
  chat_template: str
  eos_ids: tuple
  pad_id: int
  template_kwargs: tuple = ()

  @property
  def template_text(self) -> str:
    """The template text in use and its switches (part of the regeneration cache key)."""
    return template_text(self.tokenizer, self.chat_template, self.template_kwargs)

  def encode(self, messages: Sequence[dict]) -> list:
    """Chat messages [{"role", "content"}] -> prompt token ids [P] ending with the assistant header."""
    return encode_prompt(self.tokenizer, messages, self.chat_template, self.template_kwargs)

  def encode_user(self, message: str, system_prompt: str = "") -> list:
    """One user message (after an optional system message) -> prompt token ids [P]."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": message}]
    return self.encode(messages)


def prompt_encoder(target, config=None) -> PromptEncoder:
  """The PromptEncoder of `target` (a loaded weights.registry.Target: tokenizer + LlamaConfig) under
  `config` (its data.chat_template; None = the tokenizer's own template).

  Raises ChatTemplateError now, naming --config.data.chat_template, when neither the config nor the tokenizer
  gives a template (e.g. lmsys/vicuna-*-v1.3 without configs/vicuna.py's chat_template="vicuna").
  """
  tok = target.tokenizer
  if tok is None:
    raise ValueError("the target was loaded without its tokenizer (with_tokenizer=False); prompts cannot be "
                     "encoded. Load it with load_target(..., with_tokenizer=True).")
  chat_template = str(config.data.chat_template or "") if config is not None else ""
  resolve_template(tok, chat_template)  # fail before any work when there is no template
  pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else 0
  thinking = bool(config.data.enable_thinking) if config is not None else False
  return PromptEncoder(tok, chat_template, end_of_turn_ids(tok, target.config.eos_token_ids), pad_id,
                       template_switches(tok, chat_template, thinking))


def encode_chat(tokenizer, messages: Sequence[dict], response: str, chat_template: str = "",
                end_ids: Sequence[int] = (), template_kwargs: tuple = ()) -> tuple:
  """Prompt messages + assistant response text -> (input_ids int32 [T], loss_mask int32 [T]): encode_conversation
  of the messages followed by the response."""
  return encode_conversation(tokenizer, list(messages) + [{"role": "assistant", "content": response}],
                             chat_template, end_ids, template_kwargs)


def encode_conversation(tokenizer, messages: Sequence[dict], chat_template: str = "", end_ids: Sequence[int] = (),
                        template_kwargs: tuple = ()) -> tuple:
  """A conversation whose assistant turns are written [{"role", "content"}] -> (input_ids int32 [T],
  loss_mask int32 [T]), the mask on every assistant turn.

  The full conversation is rendered once with the chat template; each assistant turn's mask covers the tokens
  after the conversation before it (rendered with the generation prompt) up to and including the first
  end-of-turn token. Tokens after it (e.g. the newline ChatML puts after `<|im_end|>`), the system and user turns
  and the template tokens around them stay in input_ids with mask 0. template_kwargs: `template_switches`.

  A template whose generation prompt holds more than the assistant header it renders inside a conversation (Qwen3
  with enable_thinking false: an empty think block the answered turns do not have) has the turn start where the
  two renderings part, which must be after the whole conversation before it (else ChatTemplateError): the
  conversation is trained as the template renders it.
  """
  messages = list(messages)
  full = _apply(tokenizer, messages, chat_template, False, template_kwargs)
  ends = set(end_of_turn_ids(tokenizer, end_ids))
  mask = np.zeros(len(full), np.int32)
  for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
    prompt = encode_prompt(tokenizer, messages[:i], chat_template, template_kwargs)
    start = next((j for j, (a, b) in enumerate(zip(full, prompt)) if a != b), min(len(full), len(prompt)))
    context = _apply(tokenizer, messages[:i], chat_template, False, template_kwargs) if start < len(prompt) else ()
    if start < len(context) or full[:len(context)] != list(context):
      raise ChatTemplateError(
          "the chat template renders the prompt differently with and without the assistant turn, so the response "
          "tokens cannot be located; use a template whose generation prompt is a prefix of the full conversation.")
    stop = next((j for j in range(start, len(full)) if full[j] in ends), None)
    if stop is None:
      raise ChatTemplateError(f"no end-of-turn token (ids {sorted(ends)}) after the assistant response; pass its "
                              "id as end_ids.")
    mask[start:stop + 1] = 1
  return np.asarray(full, np.int32), mask


def build_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> tuple:
  """Prompt ids (with generation prompt) + generated response ids (end-of-turn included when produced)
  -> (input_ids int32 [P+R], loss_mask int32 [P+R]) with the mask on the response."""
  ids = np.asarray(list(prompt_ids) + list(response_ids), np.int32)
  mask = np.zeros(len(ids), np.int32)
  mask[len(prompt_ids):] = 1
  return ids, mask


@dataclasses.dataclass
class LengthStats:
  kept: int = 0
  truncated: int = 0
  dropped: int = 0        # over max_length with policy "drop"
  no_response: int = 0    # no response token left within max_length (or an empty response)

  def summary(self, max_length: int, policy: str) -> str:
    return (f"max_length={max_length} policy={policy}: {self.kept} kept ({self.truncated} truncated), "
            f"{self.dropped} dropped as too long, {self.no_response} dropped with no response token")


def apply_length_limit(sequences: Sequence[tuple], max_length: int, policy: str) -> tuple:
  """Enforce max_length on (input_ids, loss_mask) pairs -> (kept pairs, LengthStats).

  "truncate" cuts a sequence to its first max_length tokens; "drop" removes it. Either way a sequence
  with no loss-masked token left is removed. Counts are logged. Items may carry more entries after the pair
  (e.g. a multimodal sequence's images): they are kept with it.
  """
  if policy not in LENGTH_POLICIES:
    raise ValueError(f"unknown data.length_policy {policy!r}; choose one of: {', '.join(LENGTH_POLICIES)}.")
  if max_length < 2:
    raise ValueError(f"data.max_length={max_length} is too small; it must be at least 2.")
  stats, kept = LengthStats(), []
  for item in sequences:
    ids, mask, rest = item[0], item[1], tuple(item[2:])
    if len(ids) > max_length:
      if policy == "drop":
        stats.dropped += 1
        continue
      ids, mask = ids[:max_length], mask[:max_length]
      stats.truncated += 1
    if not mask.any():
      stats.no_response += 1
      continue
    kept.append((ids, mask) + rest)
  stats.kept = len(kept)
  if stats.truncated or stats.dropped or stats.no_response:
    log.warning("length limit: %s", stats.summary(max_length, policy))
  else:
    log.info("length limit: %s", stats.summary(max_length, policy))
  return kept, stats

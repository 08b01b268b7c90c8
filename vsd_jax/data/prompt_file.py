"""Prompt files for generation and evaluation: EAGLE question.jsonl (first turn) or one prompt per line.

The user messages read here are encoded with `chat.prompt_encoder(target, config).encode_user`.
"""

from __future__ import annotations

import json
import os


class PromptFileError(ValueError):
  pass


def read_prompt_file(path: str):
  """-> list of (id, user message). EAGLE question.jsonl or plain text (one prompt per line)."""
  if not os.path.isfile(path):
    raise PromptFileError(f"prompt file not found: {path!r}")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  items = []
  is_jsonl = path.endswith(".jsonl")
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if is_jsonl:
      try:
        rec = json.loads(line)
        items.append((rec.get("question_id", len(items)), rec["turns"][0]))
      except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise PromptFileError(f"{path}:{n}: not an EAGLE question record with 'turns' ({e}); fix or remove "
                              "the line, or pass a plain text file with one prompt per line.") from e
    else:
      items.append((len(items), line))
  if not items:
    raise PromptFileError(f"prompt file {path!r} has no prompts; it is empty or only blank lines.")
  return items


"""Prompt files for generation and evaluation: EAGLE question.jsonl (first turn) or one prompt per line.

The user messages read here are encoded with `chat.prompt_encoder(target, config).encode_user`.
A question.jsonl line may carry images for a multimodal (LLaVA) target: "image": a path or a list of paths
(relative ones under the file's folder, or `pkg:<package>/<path>`), one `<image>` placeholder per image in the
first turn (none: "<image>\n" is put in front, LLaVA's convention); read them with with_images=True.
"""

from __future__ import annotations

import json
import os


class PromptFileError(ValueError):
  pass


def read_prompt_file(path: str, with_images: bool = False, image_folder: str = ""):
  """-> list of (id, user message). EAGLE question.jsonl or plain text (one prompt per line).
  with_images: -> (id, user message, image file paths) (a tuple, () for a text prompt); relative image paths
  are taken under image_folder (default: the file's folder)."""
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
        item = (rec.get("question_id", len(items)), rec["turns"][0])
      except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise PromptFileError(f"{path}:{n}: not an EAGLE question record with 'turns' ({e}); fix or remove "
                              "the line, or pass a plain text file with one prompt per line.") from e
      if with_images:
        item = _with_images(item, rec, f"{path}:{n}", image_folder or os.path.dirname(os.path.abspath(path)))
      elif isinstance(rec, dict) and rec.get("image"):
        raise PromptFileError(f"{path}:{n}: the question carries an image but this command reads text prompts "
                              "only; use a multimodal (LLaVA) target with vsd_jax.evaluate.")
      items.append(item)
    else:
      items.append((len(items), line) + (((),) if with_images else ()))
  if not items:
    raise PromptFileError(f"prompt file {path!r} has no prompts; it is empty or only blank lines.")
  return items



def _with_images(item, rec, where: str, image_folder: str) -> tuple:
  from vsd_jax.data.images import resolve_image_path
  from vsd_jax.data.sources import BadRecord, place_image_placeholders, record_images
  try:
    images = record_images(rec)
    text = place_image_placeholders(item[1], len(images))
  except BadRecord as e:
    raise PromptFileError(f"{where}: {e}") from e
  return item[0], text, tuple(resolve_image_path(im, image_folder) for im in images)

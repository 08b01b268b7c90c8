"""Prompt files for generation and evaluation: EAGLE question.jsonl (first turn) or one prompt per line.

The user messages read here are encoded with `chat.prompt_encoder(target, config).encode_user`.
A question.jsonl line may carry images for a multimodal (LLaVA) target: "image": a path or a list of paths
(relative ones under the file's folder, or `pkg:<package>/<path>`), one `<image>` placeholder per image in the
first turn (none: "<image>\n" is put in front, LLaVA's convention); read them with with_images=True.
Images given apart from the file (`vsd_jax.generate --image`) join its prompts with `attach_images`.
`encode_prompt_items` turns the items into token ids (and pixel values) the way generate and evaluate both decode.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

from vsd_jax.data.images import ImageInputError, multimodal_prompts, open_image, resolve_image_path
from vsd_jax.data.sources import BadRecord, Prompt, place_image_placeholders, read_utf8, record_images
from vsd_jax.errors import UserError


class PromptFileError(UserError):
  """A prompt file (or image list) that cannot be read; the message names it and the fix."""


def read_prompt_file(path: str, with_images: bool = False, image_folder: str = ""):
  """-> list of (id, user message). EAGLE question.jsonl or plain text (one prompt per line).
  with_images: -> (id, user message, image file paths) (a tuple, () for a text prompt); relative image paths
  are taken under image_folder (default: the file's folder)."""
  if not os.path.isfile(path):
    raise PromptFileError(f"prompt file not found: {path!r}")
  lines = read_utf8(path, f"prompt file {path!r}", PromptFileError).splitlines()
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
                              "only; use a multimodal (LLaVA) target with vsd_jax.generate or vsd_jax.evaluate.")
      items.append(item)
    else:
      items.append((len(items), line) + (((),) if with_images else ()))
  if not items:
    raise PromptFileError(f"prompt file {path!r} has no prompts; it is empty or only blank lines.")
  return items



def _with_images(item, rec, where: str, image_folder: str) -> tuple:
  try:
    images = record_images(rec)
    text = place_image_placeholders(item[1], len(images))
  except BadRecord as e:
    raise PromptFileError(f"{where}: {e}") from e
  return item[0], text, tuple(resolve_image_path(im, image_folder) for im in images)


def attach_images(items, images: Sequence[str], where: str = "--image") -> list:
  """Items of read_prompt_file(with_images=True) with image files given apart from the file (e.g. --image flags):
  one image goes with every prompt, as many images as prompts go one per prompt, and any number go with a single
  prompt. Each prompt's text gets one <image> placeholder per image (none in it: "<image>\n" in front). Paths are
  `resolve_image_path` references (`pkg:<package>/<path>` too). Raises PromptFileError naming the files."""
  if not images:
    return list(items)
  files = [resolve_image_path(im) for im in images]
  named = ", ".join(map(repr, images))
  with_own = [it for it in items if it[2]]
  if with_own:
    raise PromptFileError(f"prompt {with_own[0][0]!r} already has image(s) {', '.join(map(repr, with_own[0][2]))} "
                          f"from its file, and {where} gives {named}; give the images in the file or with {where}, "
                          "not both")
  n = len(items)
  if len(files) == 1:
    per_prompt = [tuple(files)] * n
  elif len(files) == n:
    per_prompt = [(f,) for f in files]
  elif n == 1:
    per_prompt = [tuple(files)]
  else:
    raise PromptFileError(f"{len(files)} images from {where} ({named}) for {n} prompts: give one image (every prompt "
                          "gets it), one per prompt (in prompt order), or any number for a single prompt")
  out = []
  for (qid, text, _), ims in zip(items, per_prompt):
    try:
      text = place_image_placeholders(text, len(ims))
    except BadRecord as e:
      raise PromptFileError(f"prompt {qid!r} with the image(s) {', '.join(map(repr, ims))} from {where}: {e} (add an "
                            "<image> where each image goes, or pass fewer images)") from e
    out.append((qid, text, ims))
  return out


def check_image_files(items) -> None:
  """Open every image file of the items (read_prompt_file(with_images=True) / attach_images) once, before any
  model is loaded: a missing or unreadable file is an ImageInputError naming it."""
  for path in dict.fromkeys(im for it in items for im in it[2]):
    open_image(path)


@dataclasses.dataclass
class EncodedPrompts:
  """Prompt items as the decoders take them (`encode_prompt_items`)."""
  ids: list                       # token ids per prompt (a multimodal prompt's image tokens expanded)
  images: Optional[list] = None   # each prompt's image files (a tuple, () for a text prompt); None: no image at all
  pixels: Optional[object] = None  # data.images.PixelLoader of the images

  def subset(self, indices) -> "EncodedPrompts":
    """The prompts at `indices` (e.g. those a resumed run has still to decode)."""
    return EncodedPrompts([self.ids[i] for i in indices],
                          None if self.images is None else [self.images[i] for i in indices], self.pixels)

  def pixel_values(self, rows) -> Optional[object]:
    """float32 [len(rows), I, C, S, S] of the given rows' image files (run_batches' extras), or None for a text
    set (rows None)."""
    return None if rows is None or self.pixels is None else self.pixels.batch(rows)


def encode_prompt_items(target, enc, items, system_prompt: str, source: str) -> EncodedPrompts:
  """(id, user message[, image files]) items -> EncodedPrompts: each message through the chat encoder `enc`
  (`chat.prompt_encoder(target, config)`) with system_prompt; when any item has images, a LLaVA target's image
  tokens expanded and their pixel values prepared by its own processor (`images.multimodal_prompts`: a text
  target or a template that loses an <image> is an ImageInputError naming the prompt and its files). Every image
  file is prepared once here, so a bad one fails before decoding starts. source: names the prompts in errors."""
  prompts = [enc.encode_user(it[1], system_prompt) for it in items]
  if not any(len(it) > 2 and it[2] for it in items):
    image_token = getattr(target.config, "image_token_id", None)  # a LLaVA target's; None for text targets
    bad = next((it[0] for it, ids in zip(items, prompts) if image_token is not None and image_token in ids), None)
    if bad is not None:
      raise ImageInputError(f"prompt {bad!r} of {source} has an <image> placeholder but no image; give the image "
                            "(generate --image, or the question's \"image\" field) or remove the placeholder")
    return EncodedPrompts(prompts)
  ids, images, pixels = multimodal_prompts(target, [Prompt(f"{it[0]!r} of {source}", [], it[2]) for it in items],
                                           prompts)
  for path in dict.fromkeys(im for ims in images for im in ims):
    pixels.pixels(path)
  return EncodedPrompts(ids, images, pixels)

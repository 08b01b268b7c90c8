"""Images for multimodal (LLaVA) prompts: find and open image files, check them, and turn a prompt with `<image>`
placeholders plus its images into model inputs with the checkpoint's own transformers processor.

    prepare_prompt(processor, "USER: <image>\\nWhat is this? ASSISTANT:", ["cat.png"])
      -> MultimodalPrompt(input_ids int32 [T] with each <image> expanded to the model's image-token count,
                          pixel_values float32 [N, C, S, S] resized / cropped / normalised by the processor)

The processor (LlavaProcessor = the checkpoint's tokenizer + CLIPImageProcessor, PIL backend: no torch at run
time) does all resizing and normalisation; nothing here touches pixels beyond opening the file. Bad input is an
`ImageInputError` naming the file or the prompt and the fix: a missing or unreadable file, a mode the processor
would silently mangle (16-bit / float images are clipped to 0..255), an animated or multi-page file, and a
prompt whose `<image>` placeholders and images differ in number.

Image references: a path (relative ones under an image folder, as LLaVA-Instruct's `image` field), or
`pkg:<package>/<path inside it>` for a file shipped inside an installed package (the offline sample images:
`pkg:skimage/data/astronaut.png`, `pkg:matplotlib/mpl-data/sample_data/grace_hopper.jpg`), found without
importing the package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional, Sequence, Union

import numpy as np

from vsd_jax.errors import UserError
# PIL and transformers are imported where images are read: text-only runs never pay for them.

# 8-bit modes that PIL converts to RGB faithfully (LLaVA's own loader does `Image.open(f).convert("RGB")`; the
# processor converts the same way). Wider modes ("I;16", "I", "F") would be clipped to 0..255 without a word.
ACCEPTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
PACKAGE_PREFIX = "pkg:"
# How to install the packages whose bundled images the sample prompt sets use (their wheels ship the files).
PACKAGE_INSTALL = {"skimage": "pip install --no-deps scikit-image==0.26.0", "matplotlib": "pip install matplotlib"}


class ImageInputError(UserError):
  """A bad image or image prompt; the message names the file or prompt and the fix."""


@dataclasses.dataclass
class MultimodalPrompt:
  input_ids: np.ndarray                 # int32 [T], each <image> expanded to the model's image-token count
  pixel_values: Optional[np.ndarray]    # float32 [N, C, S, S] in placeholder order, or None without images
  name: str = "prompt"


def resolve_image_path(image: str, image_folder: Optional[str] = None) -> str:
  """The file an image reference names: `pkg:<package>/<path>` inside an installed package, a relative path
  under image_folder (when given), or the path itself. Existence is checked by `open_image`."""
  if image.startswith(PACKAGE_PREFIX):
    package, _, rel = image[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
      hint = PACKAGE_INSTALL.get(package, f"pip install {package}")
      raise ImageInputError(f"image {image!r}: package {package!r} is not installed; its wheel ships the file. "
                            f"Install it with `{hint}`.")
    return os.path.join(list(spec.submodule_search_locations)[0], rel)
  if image_folder and not os.path.isabs(image):
    return os.path.join(image_folder, image)
  return image


def check_image(image, name: str = "image"):
  """Raise ImageInputError unless `image` (a PIL image) is one still picture in an accepted mode; returns it."""
  frames = getattr(image, "n_frames", 1)
  if frames > 1:
    raise ImageInputError(f"{name}: has {frames} frames (animated or multi-page); LLaVA takes one still image. "
                          "Save the frame you mean as its own file.")
  if image.mode not in ACCEPTED_MODES:
    raise ImageInputError(f"{name}: image mode {image.mode!r} is not an 8-bit mode ({', '.join(ACCEPTED_MODES)}); "
                          "the processor would clip it to 0..255. Convert it to 8-bit RGB first (e.g. scale it "
                          "to 0..255 and save as PNG).")
  return image


def open_image(path: str):
  """Open, fully read and check an image file (PIL image, mode as stored). Errors name the file."""
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise ImageInputError(f"image file not found: {path!r}. Check the path (relative image paths are taken under "
                          "the data set's image folder).")
  try:
    image = Image.open(path)
    image.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageInputError(f"cannot read image file {path!r} ({type(e).__name__}: {e}); is it a complete image "
                          "(PNG, JPEG, ...)?") from e
  return check_image(image, f"image file {path!r}")


def image_token_of(processor) -> tuple:
  """(placeholder string, token id) of a LlavaProcessor."""
  return processor.image_token, int(processor.image_token_id)


def prepare_prompt(processor, text: str, images: Sequence[Union[str, "object"]] = (), name: str = "prompt",
                   image_folder: Optional[str] = None) -> MultimodalPrompt:
  """Token ids and pixel values of one prompt with `<image>` placeholders, through the checkpoint's processor.

  images: one per placeholder, in order: image references (`resolve_image_path`) or PIL images.
  The processor expands each placeholder to the model's image-token count (patches, as LLaVA's features).
  """
  placeholder, _ = image_token_of(processor)
  n_tokens = text.count(placeholder)
  refs = [im for im in images if isinstance(im, str)]
  if n_tokens != len(images):
    which = f" ({', '.join(map(repr, refs))})" if refs else ""
    if n_tokens < len(images):
      fix = f"add a {placeholder} where each extra image goes, or pass fewer images"
    else:
      fix = f"pass one image per {placeholder}, or remove the extra {placeholder}"
    raise ImageInputError(f"{name}: {n_tokens} {placeholder} placeholder(s) but {len(images)} image(s){which}; "
                          f"{fix}. Prompt: {text[:200]!r}")
  opened = []
  for i, im in enumerate(images):
    if isinstance(im, str):
      opened.append(open_image(resolve_image_path(im, image_folder)))
    else:
      opened.append(check_image(im, f"{name}: image {i}"))
  out = processor(text=text, images=opened or None, return_tensors="np")
  pixels = out.get("pixel_values") if opened else None
  return MultimodalPrompt(np.asarray(out["input_ids"][0], np.int32),
                          None if pixels is None else np.asarray(pixels, np.float32), name)


def expand_image_tokens(ids: Sequence[int], image_token_id: int, num_image_tokens: int) -> list:
  """Token ids with each image token repeated num_image_tokens times: the processor's expansion done on ids
  (for prompts tokenised elsewhere, e.g. by a chat template, with one image token per image)."""
  out = []
  for t in ids:
    out.extend([t] * num_image_tokens if t == image_token_id else [t])
  return out


def sample_prompt_path() -> str:
  """The offline sample prompt set shipped with the package: LLaVA-Instruct-format records (`image` +
  `conversations`) about images that installed packages ship (scikit-image, matplotlib)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_images.json")


def image_identity(path: str) -> str:
  """What names an image file in cache keys: its file name and byte size (not where it is installed, so a cache
  made on another machine is found, as weights.identity.weights_identity does for weights)."""
  return f"{os.path.basename(path)}:{os.path.getsize(path) if os.path.isfile(path) else -1}"


class PixelLoader:
  """Image files -> the processor's pixel values, per row of a batch with a static image count.

    loader = PixelLoader(target.processor, max_images=2)
    loader.batch([("a.png",), ("b.png", "c.png"), ()])  -> float32 [3, 2, C, S, S], blank (0) past a row's count

  Each file is opened and checked (`open_image`: errors name the file) and prepared by the checkpoint's own image
  processor, once: the last `cache_size` images are kept.
  """

  def __init__(self, processor, max_images: int = 1, cache_size: int = 1024):
    if processor is None:
      raise ImageInputError("the target has no image processor (its directory lacks processor_config.json / "
                            "preprocessor_config.json), so image prompts cannot be prepared; use the checkpoint's "
                            "full directory (llava-hf repos ship them).")
    self.processor, self.max_images, self.cache_size = processor, max(1, int(max_images)), int(cache_size)
    self._cache: dict = {}

  def pixels(self, path: str) -> np.ndarray:
    """float32 [C, S, S] of one image file."""
    if path not in self._cache:
      out = self.processor.image_processor(images=[open_image(path)], return_tensors="np")
      if len(self._cache) >= self.cache_size:
        self._cache.pop(next(iter(self._cache)))
      self._cache[path] = np.asarray(out["pixel_values"][0], np.float32)
    return self._cache[path]

  def batch(self, rows: Sequence[Sequence[str]]) -> np.ndarray:
    """float32 [len(rows), max_images, C, S, S]: row r's images at [r, :len(rows[r])], zeros after."""
    out = None
    for r, paths in enumerate(rows):
      if len(paths) > self.max_images:
        raise ImageInputError(f"a prompt has {len(paths)} images ({', '.join(map(repr, paths))}) but batches hold "
                              f"at most {self.max_images}; raise the limit (data.max_images) or split the prompt.")
      for i, path in enumerate(paths):
        image = self.pixels(path)
        if out is None:
          out = np.zeros((len(rows), self.max_images) + image.shape, np.float32)
        out[r, i] = image
    if out is None:  # no image in this batch: blank images of the processor's output shape
      from PIL import Image
      shape = self.processor.image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="np")
      out = np.zeros((len(rows), self.max_images) + np.shape(shape["pixel_values"])[1:], np.float32)
    return out


def multimodal_prompts(target, prompts, prompt_ids, max_images: int = 0) -> tuple:
  """Prompts with images for a LLaVA target -> (prompt ids with each image token expanded to the model's count,
  each prompt's image files, a PixelLoader holding max_images (0: the most of one prompt) per row).

  Raises ImageInputError naming the prompt when the target takes no images, or when a prompt's rendered image
  tokens and its images differ in number (e.g. a chat template or tokenizer that splits `<image>`)."""
  cfg = target.config
  if getattr(cfg, "image_token_id", None) is None:
    first = next(p for p in prompts if p.images)
    raise ImageInputError(f"prompt {first.id} has images ({', '.join(map(repr, first.images))}) but the target "
                          f"{target.source!r} is a text model; use a multimodal (LLaVA) target or prompts without "
                          "images")
  out = []
  for p, ids in zip(prompts, prompt_ids):
    n = sum(1 for t in ids if t == cfg.image_token_id)
    if n != len(p.images):
      raise ImageInputError(f"prompt {p.id}: the chat template and tokenizer give {n} image token(s) (id "
                            f"{cfg.image_token_id}) but the prompt has {len(p.images)} image(s); each <image> "
                            "placeholder must become one image token (check data.chat_template and the tokenizer)")
    out.append(expand_image_tokens(ids, cfg.image_token_id, cfg.num_image_tokens))
  most = max(len(p.images) for p in prompts)
  if max_images and most > max_images:
    worst = max(prompts, key=lambda p: len(p.images))
    raise ImageInputError(f"prompt {worst.id} has {most} images but data.max_images={max_images}; raise it or drop "
                          "the prompt")
  return out, [tuple(p.images) for p in prompts], PixelLoader(target.processor, max_images or most)

"""Image inputs for LLaVA prompts (vsd_jax/data/images.py): clear errors for bad images and prompts, the
processor's own preprocessing, and the offline sample prompt set (vsd_jax/data/sample_images.json)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests.tiny_hf_llava import SAMPLES, WORDS, make_processor
from vsd_jax.data.images import (ImageInputError, expand_image_tokens, open_image, prepare_prompt,
                                 resolve_image_path)

SAMPLE_SET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vsd_jax", "data",
                          "sample_images.json")
PROMPT = "USER : <image>\nwhat is in this picture ? ASSISTANT :"


@pytest.fixture(scope="module")
def processor():
  return make_processor()


def _photo():
  from PIL import Image
  return Image.open(resolve_image_path(SAMPLES[0]))


def test_package_images_resolve_without_import():
  path = resolve_image_path(SAMPLES[0])
  assert path.endswith(os.path.join("sample_data", "grace_hopper.jpg")) and os.path.isfile(path)
  with pytest.raises(ImageInputError, match=r"package 'no_such_pkg' is not installed.*pip install no_such_pkg"):
    resolve_image_path("pkg:no_such_pkg/a.png")
  assert resolve_image_path("a/b.png", "/data/images") == os.path.join("/data/images", "a/b.png")
  assert resolve_image_path("/abs/b.png", "/data/images") == "/abs/b.png"


def test_missing_and_unreadable_files_name_the_file(tmp_path):
  with pytest.raises(ImageInputError, match=r"image file not found: '.*nope\.png'"):
    open_image(str(tmp_path / "nope.png"))
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not an image at all" * 10)
  with pytest.raises(ImageInputError, match=r"cannot read image file '.*garbage\.png'"):
    open_image(str(garbage))
  truncated = tmp_path / "truncated.jpg"
  with open(resolve_image_path(SAMPLES[0]), "rb") as f:
    truncated.write_bytes(f.read()[:5000])
  with pytest.raises(ImageInputError, match=r"cannot read image file '.*truncated\.jpg'"):
    open_image(str(truncated))


def test_modes_the_processor_would_mangle_are_refused(tmp_path):
  from PIL import Image
  deep = tmp_path / "deep16.png"
  Image.fromarray(np.random.RandomState(0).randint(0, 65535, (30, 40)).astype(np.uint16)).save(deep)
  assert Image.open(deep).mode.startswith("I")
  with pytest.raises(ImageInputError, match=r"deep16\.png.*mode 'I.*not an 8-bit mode.*Convert it to 8-bit RGB"):
    open_image(str(deep))
  frames = [Image.new("RGB", (8, 8), (80 * i, 0, 0)) for i in range(3)]
  gif = tmp_path / "anim.gif"
  frames[0].save(gif, save_all=True, append_images=frames[1:])
  with pytest.raises(ImageInputError, match=r"anim\.gif.*has 3 frames"):
    open_image(str(gif))


def test_eight_bit_modes_go_through_the_processor(tmp_path, processor):
  """CMYK, L and RGBA files are accepted; the processor (not us) converts them to RGB pixel values."""
  photo = _photo()
  rgb = prepare_prompt(processor, PROMPT, [photo]).pixel_values
  for mode, ext in (("CMYK", "jpg"), ("L", "png"), ("RGBA", "png")):
    path = tmp_path / f"photo_{mode}.{ext}"
    photo.convert(mode).save(path)
    px = prepare_prompt(processor, PROMPT, [str(path)]).pixel_values
    assert px.shape == rgb.shape == (1, 3, 42, 42) and px.dtype == np.float32
    if mode == "L":
      assert np.allclose(px[0, 0] * 0.26862954 + 0.48145466, px[0, 1] * 0.26130258 + 0.4578275, atol=1e-5)
    if mode == "RGBA":
      np.testing.assert_array_equal(px, rgb)


def test_placeholder_and_image_counts_must_match(processor):
  with pytest.raises(ImageInputError, match=r"row 3: 1 <image> placeholder\(s\) but 2 image\(s\) \('a\.png', "
                                            r"'b\.png'\); add a <image> where each extra image goes"):
    prepare_prompt(processor, PROMPT, ["a.png", "b.png"], name="row 3")
  with pytest.raises(ImageInputError, match=r"q7: 1 <image> placeholder\(s\) but 0 image\(s\); pass one image per"):
    prepare_prompt(processor, PROMPT, [], name="q7")
  with pytest.raises(ImageInputError, match=r"prompt: 0 <image> placeholder\(s\) but 1 image\(s\)"):
    prepare_prompt(processor, "USER : what ?", [_photo()])


def test_expand_image_tokens_is_the_processors_expansion(processor):
  image_id = WORDS.index("<image>")
  text = "USER : <image> first , <image> second ? ASSISTANT :"
  one_each = processor.tokenizer(text)["input_ids"]
  assert one_each.count(image_id) == 2
  ours = expand_image_tokens(one_each, image_id, 9)
  ref = prepare_prompt(processor, text, [_photo(), _photo()]).input_ids.tolist()
  assert ours == ref


def test_sample_prompt_set_is_llava_instruct_and_offline(processor):
  """Every record: LLaVA-Instruct fields, one image reference per <image> in the first human turn, and each
  image shipped inside an installed package (scikit-image's wheel bundles its sample images; install it with
  `pip install --no-deps scikit-image==0.26.0`: the files are read without importing it)."""
  with open(SAMPLE_SET) as f:
    records = json.load(f)
  assert len(records) >= 10 and len({r["id"] for r in records}) == len(records)
  have_skimage = importlib.util.find_spec("skimage") is not None
  for r in records:
    images = r["image"] if isinstance(r["image"], list) else [r["image"]]
    turns = r["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] and turns[1]["value"]
    if not have_skimage and any(i.startswith("pkg:skimage/") for i in images):
      with pytest.raises(ImageInputError, match="pip install --no-deps scikit-image"):
        resolve_image_path(images[0])
      continue
    # The words of the tiny test tokenizer do not matter here: only placeholders, files and pixels.
    p = prepare_prompt(processor, turns[0]["value"], images, name=r["id"])
    assert p.pixel_values.shape == (len(images), 3, 42, 42)
    assert (p.input_ids == WORDS.index("<image>")).sum() == 9 * len(images)

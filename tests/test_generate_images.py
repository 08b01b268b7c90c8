"""Image prompts in `python -m vsd_jax.generate` (--image, and question.jsonl lines with an "image" field) on a random
tiny LLaVA (weights/tiny_llava.py) with scikit-image's bundled sample images: generate's main run end to end on CPU
(vanilla, and speculative with a draft that has the vision adaptor: equal tokens at T=0), and the errors for bad
image paths, images given to a text-only target and more images than image placeholders, each naming the file.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAVA_CONFIG = os.path.join(REPO, "configs", "llava.py")
ASTRONAUT, COFFEE = "pkg:skimage/data/astronaut.png", "pkg:skimage/data/coffee.png"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """The registry's "tiny-llava-random" (configs/llava.py:tiny's target) written under a fresh VSD_JAX_CACHE."""
  from vsd_jax.weights.tiny_llava import make_tiny_llava
  return make_tiny_llava(str(tmp_path_factory.mktemp("cache") / "tiny-llava-random"))


def run_generate(tiny_dir, *argv):
  """generate.main with --config configs/llava.py:tiny and these flags, parsed by absl as the CLI does, its target
  "tiny-llava-random" read from tiny_dir (VSD_JAX_CACHE); the flags are reset afterwards."""
  import sys
  from unittest import mock

  from absl import flags

  from vsd_jax import generate
  args = ["vsd_jax.generate", "--config", LLAVA_CONFIG, *argv]
  try:
    with mock.patch.object(sys, "argv", args):  # ml_collections looks for --config.* overrides there
      flags.FLAGS(args)
    with mock.patch.dict(os.environ, VSD_JAX_CACHE=os.path.dirname(tiny_dir)):
      generate.main(None)
  finally:
    flags.FLAGS.unparse_flags()


def _adaptor_draft(target, directory):
  """A random draft with a random (non-zero) vision adaptor, saved where --draft reads it."""
  import flax.linen as nn

  from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
  from vsd_jax.models.features import embedding_matrix
  from vsd_jax.weights.draft_io import save_draft
  v = target.config.vocab_size
  cfg = Eagle3Config.from_target(target.config, draft_vocab_size=v, vision_adaptor=True)
  params = nn.unbox(Eagle3Draft(cfg).init(jax.random.PRNGKey(0), embedding_matrix(target.params),
                                          jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, 3 * cfg.hidden_size)))["params"])
  rng = np.random.default_rng(0)
  params = dict(params, vision_adaptor=jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape).astype(np.float32),
                                                    params["vision_adaptor"]))
  return save_draft(str(directory), cfg, params, np.zeros((v,), np.int32), np.ones((v,), bool), target.config)


@pytest.mark.slow  # two CLI runs (each compiles its decoder): about 30 s on 2 idle cores
def test_generate_with_images_vanilla_equals_speculative(tiny_dir, tmp_path):
  """Two prompts, one --image each, batched together: both decoders give the same tokens at T=0; each prompt holds
  its image's 9 image tokens, the output lines name the image, and the first new token is the target's argmax
  given the image (which differs from its argmax without it for at least one prompt)."""
  from vsd_jax.data.images import PixelLoader, resolve_image_path
  from vsd_jax.weights import load_target
  target = load_target(tiny_dir)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Who is in this photo?\nDescribe the drink and how it is served.\n")
  common = ["--prompts", str(prompts), "--image", ASTRONAUT, "--image", COFFEE, "--max_new_tokens", "12",
            "--temperature", "0", "--batch_size", "2"]
  run_generate(tiny_dir, *common, "--output", str(tmp_path / "vanilla.jsonl"))
  run_generate(tiny_dir, *common, "--output", str(tmp_path / "spec.jsonl"), "--draft",
               _adaptor_draft(target, tmp_path / "d"),
               "--tree_depth", "3", "--top_k", "3", "--total_tokens", "6")
  van, spec = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()]
               for f in ("vanilla.jsonl", "spec.jsonl"))
  assert [r["output_ids"] for r in spec] == [r["output_ids"] for r in van]
  assert all(len(r["output_ids"]) > 0 for r in van)
  image_token = target.config.image_token_id
  loader = PixelLoader(target.processor)
  for row, image in zip(van, (ASTRONAUT, COFFEE)):
    path = resolve_image_path(image)
    assert row["images"] == [path] and row["prompt_ids"].count(image_token) == target.config.num_image_tokens
    ids = jnp.asarray([row["prompt_ids"]], jnp.int32)
    with_image = target.model.apply({"params": target.params}, ids, pixel_values=jnp.asarray(loader.batch([(path,)])))
    assert row["output_ids"][0] == int(jnp.argmax(with_image.logits[0, -1]))
    row["text_only_first"] = int(jnp.argmax(target.model.apply({"params": target.params}, ids).logits[0, -1]))
  assert any(r["output_ids"][0] != r["text_only_first"] for r in van)


def test_image_errors_name_the_file(tiny_dir, tmp_path):
  """Bad --image paths, more images than placeholders, and image counts that fit no prompt layout fail before the
  target loads, naming the files; a question file line's image is checked the same way."""
  from vsd_jax.data.images import ImageInputError
  from vsd_jax.data.prompt_file import PromptFileError
  one = tmp_path / "one.txt"
  one.write_text("Compare <image> with this.\n")
  two = tmp_path / "two.txt"
  two.write_text("First?\nSecond?\n")
  base = [tiny_dir, "--output", str(tmp_path / "o.jsonl")]
  missing = str(tmp_path / "no_such_cat.png")
  with pytest.raises(ImageInputError, match=f"image file not found: '{missing}'"):
    run_generate(*base, "--prompts", str(two), "--image", missing)
  with pytest.raises(PromptFileError, match=r"astronaut\.png.*coffee\.png.*1 <image> placeholder\(s\) but 2 image"):
    run_generate(*base, "--prompts", str(one), "--image", ASTRONAUT, "--image", COFFEE)
  with pytest.raises(PromptFileError, match=r"3 images from --image .*astronaut\.png.* for 2 prompts"):
    run_generate(*base, "--prompts", str(two), "--image", ASTRONAUT, "--image", COFFEE, "--image", ASTRONAUT)
  questions = tmp_path / "question.jsonl"
  questions.write_text(json.dumps({"question_id": 1, "turns": ["What is this?"], "image": "broken.png"}) + "\n")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ImageInputError, match=r"cannot read image file '.*broken\.png'"):
    run_generate(*base, "--prompts", str(questions))
  with pytest.raises(PromptFileError, match=r"prompt 1 already has image\(s\) '.*broken\.png'"):
    run_generate(*base, "--prompts", str(questions), "--image", ASTRONAUT)
  assert not (tmp_path / "o.jsonl").exists()


def test_images_for_a_text_target_and_placeholders_without_images(tiny_dir):
  """The shared prompt encoder (generate's and evaluate's): images given to a text-only target are an error naming
  the prompt and the image file; an <image> placeholder with no image, for a LLaVA target, is one too; image tokens
  are expanded to the model's count."""
  from vsd_jax.data.chat import prompt_encoder
  from vsd_jax.data.images import ImageInputError, resolve_image_path
  from vsd_jax.data.prompt_file import attach_images, encode_prompt_items
  from vsd_jax.models.llama import LlamaConfig
  from vsd_jax.weights import load_target
  items = attach_images([(0, "What is this?", ())], [ASTRONAUT])
  assert items == [(0, "<image>\nWhat is this?", (resolve_image_path(ASTRONAUT),))]
  text_target = types.SimpleNamespace(config=LlamaConfig(), source="smollm2-135m-instruct")
  encoder = types.SimpleNamespace(encode_user=lambda text, system: [1, 2, 3])
  with pytest.raises(ImageInputError, match=r"prompt 0 of p\.txt has images \('.*astronaut\.png'\) but the target "
                                            r"'smollm2-135m-instruct' is a text model"):
    encode_prompt_items(text_target, encoder, items, "", "p.txt")
  llava = load_target(tiny_dir)
  import importlib.util
  spec = importlib.util.spec_from_file_location("llava_cfg", LLAVA_CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  enc = prompt_encoder(llava, mod.get_config("tiny"))
  with pytest.raises(ImageInputError, match=r"prompt 3 of q\.jsonl has an <image> placeholder but no image"):
    encode_prompt_items(llava, enc, [(3, "<image>\nWhat is this?", ())], "", "q.jsonl")
  out = encode_prompt_items(llava, enc, items + [(1, "Plain text.", ())], "", "p.txt")
  assert [ids.count(llava.config.image_token_id) for ids in out.ids] == [9, 0] and out.images[1] == ()
  assert out.pixel_values([out.images[0], ()]).shape == (2, 1, 3, 42, 42) and out.pixel_values(None) is None


@pytest.mark.slow  # two CLI runs (each compiles its decoder): about 30 s on 2 idle cores
def test_generate_decodes_without_the_draft_when_no_shape_pays(tiny_dir, tmp_path, monkeypatch, capsys):
  """generate --draft without a fixed shape takes the autotuner's choice; when that choice is predicted slower than
  vanilla (predicted_speedup < 1) it decodes without the draft and says so, else it speculates: same tokens at T=0
  either way, and speculative_generate called only in the second case."""
  from vsd_jax.decoding import autotune, speculative
  from vsd_jax.decoding.tree import TreeConfig
  from vsd_jax.weights import load_target
  target = load_target(tiny_dir)
  draft_dir = _adaptor_draft(target, tmp_path / "d")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Name three colours.\nCount to five.\n")
  calls, predicted = [], {}
  spec = speculative.speculative_generate

  def recording_spec(*args, **kwargs):
    calls.append(kwargs["tree_cfg"])
    return spec(*args, **kwargs)

  def fake_choice(*args, **kwargs):  # the autotuner's outcome, without timing anything
    row = dict(name="chain depth 2", speedup=predicted["x"])
    return autotune.Choice(TreeConfig(depth=2, mode="chain"), predicted["x"], [row], "key")

  monkeypatch.setattr(speculative, "speculative_generate", recording_spec)
  monkeypatch.setattr(autotune, "choose_shape", fake_choice)
  outputs = {}
  for x in (0.8, 1.3):
    predicted["x"] = x
    out = tmp_path / f"out_{x}.jsonl"
    run_generate(tiny_dir, "--prompts", str(prompts), "--max_new_tokens", "8", "--temperature", "0",
                 "--batch_size", "2", "--draft", draft_dir, "--output", str(out))
    outputs[x] = [json.loads(line)["output_ids"] for line in out.read_text().splitlines()]
    err = capsys.readouterr().err
    assert ("decoding without the draft" in err) == (x < 1), err[-2000:]
    assert (len(calls) > 0) == (x >= 1), calls  # no speculative call at 0.8; at 1.3 one per batch
  assert set(calls) == {TreeConfig(depth=2, mode="chain")}
  assert outputs[0.8] == outputs[1.3] and all(outputs[0.8])

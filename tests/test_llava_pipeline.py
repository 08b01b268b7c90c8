"""The multimodal pipeline on a random tiny LLaVA (vsd_jax/weights/tiny_llava.py, written here without torch and
loaded through weights.load_target): the target pass with images, speculative decoding with image prompts against
vanilla multimodal decoding, and one train step of each method on a batch with images.

Prompts: the offline sample images (scikit-image / matplotlib files) through the checkpoint's own processor.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsd_jax.data.images import prepare_prompt
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.decoding.vanilla import generate
from vsd_jax.models.features import embedding_matrix, language_model_params, target_features, target_pass

IMAGES = ["pkg:skimage/data/astronaut.png", "pkg:skimage/data/chelsea.png", "pkg:skimage/data/coffee.png"]
TREE = TreeConfig(depth=3, top_k=3, total_tokens=8, mode="tree")
CHAIN = TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  from vsd_jax.weights import load_target
  from vsd_jax.weights.tiny_llava import make_tiny_llava
  return load_target(make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava"))))


def _prompts(llava):
  """3 right-padded rows: one image, two images, one image; per-row pixel_values [3, 2, C, S, S] (blank padding)."""
  texts = [("USER: <image>\nWho is in this photo? ASSISTANT:", IMAGES[:1]),
           ("USER: First image: <image>\nSecond image: <image>\nHow do these two pictures differ? ASSISTANT:",
            IMAGES[1:3]),
           ("USER: <image>\nDescribe the drink. ASSISTANT:", IMAGES[2:3])]
  rows = [prepare_prompt(llava.processor, t, im, name=f"row {i}") for i, (t, im) in enumerate(texts)]
  p = max(len(r.input_ids) for r in rows)
  ids = np.zeros((3, p), np.int32)
  pixels = np.zeros((3, 2) + rows[0].pixel_values.shape[1:], np.float32)
  for i, r in enumerate(rows):
    ids[i, :len(r.input_ids)] = r.input_ids
    pixels[i, :len(r.pixel_values)] = r.pixel_values
  return jnp.asarray(ids), jnp.asarray([len(r.input_ids) for r in rows], jnp.int32), jnp.asarray(pixels), rows


def _draft(llava, seed=1):
  import flax.linen as nn
  from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
  v = llava.config.vocab_size
  dcfg = Eagle3Config.from_target(llava.config, draft_vocab_size=v)
  draft = Eagle3Draft(dcfg)
  ids, feats = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, 3 * dcfg.hidden_size))
  params = nn.unbox(draft.init(jax.random.PRNGKey(seed), embedding_matrix(llava.params), ids, feats)["params"])
  return draft, params, jnp.zeros((v,), jnp.int32)


def test_embedding_accessor_and_multimodal_target_pass(llava):
  """The draft's embedding is the language model's; target_pass with per-row images equals the model's own call
  with flat images in token order, and the features at and after the image tokens depend on the image."""
  lm = language_model_params(llava.params)
  assert embedding_matrix(llava.params) is lm["embed_tokens"]["embedding"]
  assert embedding_matrix(lm) is lm["embed_tokens"]["embedding"]
  ids, lens, pixels, rows = _prompts(llava)
  valid = jnp.arange(ids.shape[1])[None, :] < lens[:, None]
  tp = jax.jit(target_pass, static_argnums=(0, 4))(llava.model, llava.params, ids, valid, 0, pixels)
  flat = jnp.asarray(np.concatenate([r.pixel_values for r in rows]))
  f_flat, l_flat = jax.jit(target_features, static_argnums=0)(llava.model, llava.params, ids, valid, flat)
  np.testing.assert_allclose(tp.features, f_flat, atol=1e-4)
  np.testing.assert_allclose(tp.logits, l_flat, atol=1e-4)
  f_text, _ = jax.jit(target_features, static_argnums=0)(llava.model, llava.params, ids, valid)
  is_image = np.asarray(ids == llava.config.image_token_id)
  diff = np.abs(np.asarray(tp.features) - np.asarray(f_text)).max(-1)
  assert diff[is_image].min() > 1e-2                      # image positions: the image features
  first = int(np.argmax(is_image[0]))
  assert np.all(diff[0, :first] < 1e-5)                  # before the first image: causal, unchanged
  assert diff[0, int(lens[0]) - 1] > 1e-2                 # the last prompt token sees the image


def _vanilla(llava, ids, lens, pixels, max_new, temperature=0.0, seed=0):
  return generate(llava.model, llava.params, ids, lens, jax.random.PRNGKey(seed), temperature,
                  max_new_tokens=max_new, cache_slots=ids.shape[1] + max_new, pixel_values=pixels)


N_NEW = 24


@pytest.fixture(scope="module")
def greedy_reference(llava):
  """Vanilla multimodal greedy decoding of _prompts, and the same prompts' decoding without their images."""
  ids, lens, pixels, _ = _prompts(llava)
  return _vanilla(llava, ids, lens, pixels, N_NEW), _vanilla(llava, ids, lens, None, N_NEW)


def test_images_change_the_output(greedy_reference):
  ref, no_image = greedy_reference
  for row in range(3):
    assert not np.array_equal(np.asarray(no_image.tokens[row]), np.asarray(ref.tokens[row])), row


@pytest.mark.parametrize("tree_cfg", [TREE, CHAIN], ids=["tree", "chain"])
def test_greedy_speculative_with_images_equals_vanilla(llava, greedy_reference, tree_cfg):
  """T=0: speculative decoding with image prompts (prefill with the images, then the usual rounds) gives
  vanilla multimodal decoding's tokens, batched (rows with 1 and 2 images, right-padded)."""
  ids, lens, pixels, _ = _prompts(llava)
  draft, dparams, d2t = _draft(llava)
  ref = greedy_reference[0]
  out = speculative_generate(llava.model, llava.params, draft, dparams, d2t, ids, lens, jax.random.PRNGKey(0),
                             tree_cfg=tree_cfg, max_new_tokens=N_NEW,
                             cache_slots=required_slots(ids.shape[1], N_NEW, tree_cfg), pixel_values=pixels)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.num_new), np.asarray(ref.num_new))


def _data_config(workdir, method="eagle3"):
  from vsd_jax.config_base import base_config
  from vsd_jax.data.images import sample_prompt_path
  c = base_config()
  c.workdir = str(workdir)
  c.method = method
  c.model.max_positions = 512
  c.data.sources = dict(sample=dict(type="llava", path=sample_prompt_path(), limit=4))
  c.data.chat_template = "llava"
  c.data.max_length, c.data.buckets, c.data.draft_vocab_size = 96, (96,), 64
  c.data.regen.max_new_tokens, c.data.regen.batch_size = 12, 4
  c.train.batch_size = 2
  c.draft.ttt_steps = 3
  c.vsd.depth, c.vsd.num_paths, c.vsd.num_anchors, c.vsd.burn_in = 2, 2, 2, 0
  return c


@pytest.fixture(scope="module")
def llava_data(llava, tmp_path_factory):
  from vsd_jax.data.pipeline import prepare_data
  c = _data_config(tmp_path_factory.mktemp("llava_run"))
  return c, prepare_data(c, llava, progress=False)


def test_llava_instruct_source_and_data(llava, llava_data):
  """LLaVA-Instruct records -> prompts with images -> responses regenerated by the target with the images ->
  sequences with their images and a loss mask on the response only; batches carry per-row pixel_values."""
  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.data.sources import read_source
  c, data = llava_data
  prompts, _ = read_source("sample", c.data.sources.sample, c.data.root)
  assert [len(p.images) for p in prompts] == [1, 1, 1, 1] and prompts[0].messages[-1]["content"].startswith("<image>")
  ds = data.dataset
  assert len(ds) == 4 and ds.images == [p.images for p in prompts] and data.pixels is not None
  image_id, p = llava.config.image_token_id, llava.config.num_image_tokens
  for ids, mask in zip(ds.input_ids, ds.loss_mask):
    assert (ids == image_id).sum() == p and not mask[ids == image_id].any() and mask.sum() > 0
  batch = next(iterate_batches(ds, 2, seed=0, buckets=(96,), pixels=data.pixels))
  assert batch["pixel_values"].shape == (2, 1, 3, 42, 42) and np.abs(batch["pixel_values"]).sum() > 0


@pytest.mark.parametrize("method", ["eagle3", "vsd"])
def test_one_train_step_on_a_batch_with_images(llava, llava_data, method):
  """One jitted train step of each method on a tiny LLaVA batch with images: finite loss, nonzero gradients."""
  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.methods import build_method
  from vsd_jax.training.trainer import MethodSteps
  c, data = llava_data
  c = c.copy_and_resolve_references()
  c.method = method
  if method == "vsd":  # paths, oracle, E-step and CAR on the image prefix (the EAGLE-3 term is the eagle3 case)
    c.vsd.mu = 0.0
  batch = next(iterate_batches(data.dataset, 2, seed=0, buckets=(96,), pixels=data.pixels))
  from vsd_jax import parallel
  n = 2 if method == "eagle3" else 1  # eagle3: the batch and its pixel_values split over 2 devices
  c.mesh.data = n
  mesh = parallel.make_mesh(c, jax.devices()[:n])
  metrics = jax.device_get(MethodSteps(c, build_method(c, llava, data.draft_vocab), mesh=mesh)(batch))
  assert bool(metrics["finite"]) and np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, metrics
  assert metrics["num_tokens" if method == "eagle3" else "anchors"] > 0


def test_image_tokens_are_never_predicted(llava):
  from vsd_jax.methods.eagle3 import drop_image_tokens
  ids = jnp.asarray([[5, 4, 4, 7, 8]])
  np.testing.assert_array_equal(drop_image_tokens(jnp.ones((1, 5), jnp.int32), ids, llava.config), [[1, 0, 0, 1, 1]])
  np.testing.assert_array_equal(drop_image_tokens(jnp.ones((1, 5), jnp.int32), ids, llava.config.text), 1)


def test_tiny_checkpoint_round_trip_and_arch_table(llava):
  """The tiny checkpoint's weights load back exactly (the name table read backwards, then forwards), and its
  config is the arch table's "tiny-llava-random" entry (what configs/llava.py:tiny dry-runs)."""
  from vsd_jax import dry_run
  from vsd_jax.config_base import base_config
  from vsd_jax.weights.tiny_llava import random_params
  want = random_params(llava.config, seed=0)
  assert jax.tree.structure(want) == jax.tree.structure(llava.params)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(llava.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  c = base_config()
  c.model.name = "tiny-llava-random"
  assert dry_run.target_config(c) == llava.config
  assert llava.config.eagle3_layers == (2, 4, 5) and llava.config.num_image_tokens == 9


def test_llava_instruct_format_errors_and_options(tmp_path):
  import json
  from PIL import Image
  from vsd_jax.data.sources import DataSourceError, read_source
  Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "red.png")
  human = lambda text: [{"from": "human", "value": text}, {"from": "gpt", "value": "ignored"}]  # noqa: E731
  recs = [{"id": "a", "image": "red.png", "conversations": human("What colour is this?")},
          {"id": "b", "conversations": human("A text question.")},
          {"id": "c", "image": ["red.png", "red.png"], "conversations": human("<image> and <image>: same?")},
          {"id": "d", "image": "red.png", "conversations": human("<image> vs <image>?")}]
  path = tmp_path / "instruct.json"
  path.write_text(json.dumps(recs))
  spec = dict(type="llava", path=str(path))
  with pytest.raises(DataSourceError, match=r"instruct\.json\[3\].*2 <image> placeholder\(s\) but 1 image"):
    read_source("s", spec, str(tmp_path))
  prompts, stats = read_source("s", dict(spec, limit=3), str(tmp_path))
  red = str(tmp_path / "red.png")  # relative paths: under the file's folder by default
  assert [p.images for p in prompts] == [(red,), (), (red, red)]
  assert prompts[0].messages[-1]["content"] == "<image>\nWhat colour is this?"  # LLaVA's convention
  later, _ = read_source("s", dict(spec, start=1, limit=1), str(tmp_path))
  assert [p.id.split(os.sep)[-1] for p in later] == ["instruct.json[1]"] and later[0].images == ()
  sub = tmp_path / "imgs"
  sub.mkdir()
  moved, _ = read_source("s", dict(spec, limit=1, image_folder="imgs"), str(tmp_path))
  assert moved[0].images == (str(sub / "red.png"),)


def test_question_file_with_images(tmp_path):
  import json
  from vsd_jax.data.prompt_file import PromptFileError, read_prompt_file
  path = tmp_path / "question.jsonl"
  lines = [{"question_id": 1, "turns": ["What is this?"], "image": "pkg:skimage/data/coffee.png"},
           {"question_id": 2, "turns": ["Plain text."]}]
  path.write_text("\n".join(json.dumps(x) for x in lines))
  items = read_prompt_file(str(path), with_images=True)
  assert items[0][1] == "<image>\nWhat is this?" and items[0][2][0].endswith(os.path.join("data", "coffee.png"))
  assert items[1] == (2, "Plain text.", ())
  with pytest.raises(PromptFileError, match=r"question\.jsonl:1: the question carries an image"):
    read_prompt_file(str(path))


def test_llava_configs_and_arch_entries():
  from vsd_jax import dry_run
  from vsd_jax.cli_config import load_config_file
  from vsd_jax.models.llava import LlavaConfig
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  import importlib.util
  spec = importlib.util.spec_from_file_location("llava_cfg", os.path.join(repo, "configs", "llava.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for arg, layers, hidden in (("7b", 32, 4096), ("13b-text", 40, 5120)):
    c = mod.get_config(arg)
    cfg = dry_run.target_config(c)
    assert isinstance(cfg, LlavaConfig) and cfg.num_layers == layers and cfg.hidden_size == hidden
    assert cfg.num_image_tokens == 576 and cfg.vocab_size == 32064 and cfg.image_token_id == 32000
    assert cfg.feature_layers == (23,) and c.data.chat_template == "llava"
  assert mod.get_config("7b").draft.init_from.endswith(os.path.join("llava7b-text", "draft"))
  assert mod.get_config("7b").data.sources.llava_instruct.format == "llava"
  assert load_config_file(os.path.join(repo, "configs", "llava.py")).model.name == "tiny-llava-random"
  with pytest.raises(ValueError, match="unknown size or stage"):
    mod.get_config("30b")


N_SAMPLES = 20000


def _image_prompt(llava, text="USER: <image>\nWhat shape is this? ASSISTANT:", image="pkg:skimage/data/horse.png"):
  """(ids int32 [1, P], image features [1, 1, num_image_tokens, H]) of one image prompt."""
  p = prepare_prompt(llava.processor, text, [image])
  feats = jax.jit(lambda prm, px: llava.model.apply({"params": prm}, px, method="image_features"))(
      llava.params, jnp.asarray(p.pixel_values[None]))
  return jnp.asarray(p.input_ids[None]), feats


def _trained_draft(llava, ids, feats, steps=30, seed=0):
  """An EAGLE-3 draft trained for a few seconds on the target's own sampled continuations of the image prompt
  (features of the multimodal prefill), so that its tokens get accepted."""
  import optax
  from vsd_jax.methods.eagle3.loss import eagle3_loss
  draft, dparams, d2t = _draft(llava, seed + 1)
  n, p = 256, ids.shape[1]
  rows = jnp.broadcast_to(ids, (n, p))
  fe = jnp.broadcast_to(feats, (n,) + feats.shape[1:])
  out = generate(llava.model, llava.params, rows, jnp.full((n,), p, jnp.int32), jax.random.PRNGKey(seed), 1.0,
                 max_new_tokens=12, cache_slots=p + 12, image_features=fe)
  seqs = jnp.concatenate([rows, out.tokens], axis=1)
  tf, tl = jax.jit(target_features, static_argnums=0)(llava.model, llava.params, seqs, None, None, fe)
  mask = jnp.broadcast_to(jnp.arange(seqs.shape[1])[None] >= p, seqs.shape)
  t2d = jnp.ones((llava.config.vocab_size,), bool)
  embed = embedding_matrix(llava.params)
  opt = optax.adam(3e-3)
  state = opt.init(dparams)

  @jax.jit
  def step(dp, st):
    g = jax.grad(lambda q: eagle3_loss(q, draft, embed, tf, seqs, tl, mask, t2d, d2t, num_steps=3)[0])(dp)
    upd, st = opt.update(g, st)
    return optax.apply_updates(dp, upd), st

  for _ in range(steps):
    dparams, state = step(dparams, state)
  return draft, dparams, d2t


def _exact_two_tokens(llava, ids, feats, temperature):
  """p(x1, x2 | image prompt) at `temperature` by enumeration with plain target forwards -> [V, V]."""
  v, p = llava.config.vocab_size, ids.shape[1]
  seqs = jnp.concatenate([jnp.broadcast_to(ids, (v, p)), jnp.arange(v, dtype=jnp.int32)[:, None]], axis=1)
  kw = {} if feats is None else dict(image_features=jnp.broadcast_to(feats, (v,) + feats.shape[1:]))
  logits = jax.jit(lambda prm, s: llava.model.apply({"params": prm}, s, **kw).logits)(llava.params, seqs)
  logp = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1), np.float64)
  pr = np.exp(logp[0, p - 1])[:, None] * np.exp(logp[:, p])
  return pr / pr.sum()


def _chi2_pvalue(samples, expected):
  from scipy import stats
  v = expected.shape[0]
  counts = np.bincount(samples[:, 0] * v + samples[:, 1], minlength=v * v).astype(np.float64)
  exp = expected.reshape(-1) * len(samples)
  big = exp >= 5
  obs, ex = np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())
  return stats.chisquare(obs, ex).pvalue


@pytest.mark.slow
def test_sampling_with_images_matches_the_target(llava):
  """T>0 (as tests/test_speculative.py does for text): speculative samples of the first two new tokens after an
  image prompt (tree and chain, a draft that gets accepted) follow the target's exact distribution given the image
  (chi-square, p > 1e-3), and the same test rejects the distribution without the image (the test has power to
  see the image); T=0 with that draft equals vanilla and accepts drafts."""
  ids, feats = _image_prompt(llava)
  draft, dparams, d2t = _trained_draft(llava, ids, feats)
  p = ids.shape[1]
  exact, text_only = _exact_two_tokens(llava, ids, feats, 1.0), _exact_two_tokens(llava, ids, None, 1.0)
  for tree_cfg in (TREE, CHAIN):
    chunks = []
    for seed in range(4):
      n = N_SAMPLES // 4
      out = speculative_generate(
          llava.model, llava.params, draft, dparams, d2t, jnp.broadcast_to(ids, (n, p)),
          jnp.full((n,), p, jnp.int32), jax.random.PRNGKey(seed), tree_cfg=tree_cfg, max_new_tokens=2,
          temperature=1.0, cache_slots=required_slots(p, 2, tree_cfg),
          image_features=jnp.broadcast_to(feats, (n,) + feats.shape[1:]))
      chunks.append(np.asarray(out.tokens))
      accepted = int(np.asarray(out.accept_hist)[:, 1:].sum())
      assert accepted > n // 10, (tree_cfg.mode, accepted)  # the verification rule is exercised
    samples = np.concatenate(chunks)
    assert _chi2_pvalue(samples, exact) > 1e-3, tree_cfg.mode
    assert _chi2_pvalue(samples, text_only) < 1e-3, tree_cfg.mode
  n_new = 24
  rows = jnp.broadcast_to(ids, (2, p))
  fe = jnp.broadcast_to(feats, (2,) + feats.shape[1:])
  ref = generate(llava.model, llava.params, rows, jnp.full((2,), p, jnp.int32), jax.random.PRNGKey(0), 0.0,
                 max_new_tokens=n_new, cache_slots=p + n_new, image_features=fe)
  out = speculative_generate(llava.model, llava.params, draft, dparams, d2t, rows, jnp.full((2,), p, jnp.int32),
                             jax.random.PRNGKey(0), tree_cfg=TREE, max_new_tokens=n_new,
                             cache_slots=required_slots(p, n_new, TREE), image_features=fe)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert float(out.num_new.sum() / out.rounds.sum()) > 1.3


@pytest.mark.slow
def test_train_and_evaluate_cli_on_the_tiny_config(tmp_path):
  """`python -m vsd_jax.train --config configs/llava.py:tiny` end to end (a few steps), then `vsd_jax.evaluate` on
  the offline image questions: T=0 outputs identical to vanilla multimodal decoding."""
  import json
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, VSD_JAX_CACHE=str(tmp_path / "cache"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")  # one CPU device, as on a workstation
  work = tmp_path / "run"
  train = [sys.executable, "-m", "vsd_jax.train", "--config", "configs/llava.py:tiny", f"--config.workdir={work}",
           "--config.train.total_steps=4", "--config.train.warmup_steps=1", "--config.train.progress_bar=False"]
  r = subprocess.run(train, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((work / "report.json").read_text())
  assert report["steps"] == 4 and report["heldout"]["sequences"] == 3 and report["data"]["sequences"] == 8
  evaluate = [sys.executable, "-m", "vsd_jax.evaluate", "--config", "configs/llava.py:tiny", f"--config.workdir={work}",
              "--draft", str(work / "draft"), "--bench", "vsd_jax/data/sample_images_questions.jsonl",
              "--num_prompts", "3", "--max_new_tokens", "12", "--tree_depth", "3", "--top_k", "3",
              "--total_tokens", "6", "--output_dir", str(tmp_path / "eval")]
  r = subprocess.run(evaluate, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
  assert results["sample_images_questions@T=0"]["identical_outputs"] == 3

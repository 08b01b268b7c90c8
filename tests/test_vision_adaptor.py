"""The EAGLE-3 draft's ViSpec-style vision adaptor (models/eagle3.py `VisionAdaptor`, config.draft.vision_adaptor) on
a random tiny LLaVA: a fresh adaptor is the plain draft, rows without images are untouched, a train step reaches
its parameters (EAGLE-3 and VSD), speculative decoding with it stays lossless, drafts with it save, load and start
from text-stage drafts, the EAGLE-3 export refuses it, and a text target with it on is an error.

Batch: the offline sample images through the checkpoint's processor, rows with one image, two images and none.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsd_jax.data.images import prepare_prompt
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
from vsd_jax.models.features import embedding_matrix, target_pass

IMAGES = ["pkg:skimage/data/astronaut.png", "pkg:skimage/data/chelsea.png", "pkg:skimage/data/coffee.png"]
TEXTS = [("USER: <image>\nWho is in this photo? ASSISTANT:", IMAGES[:1]),
         ("USER: First image: <image>\nSecond image: <image>\nHow do these two pictures differ? ASSISTANT:",
          IMAGES[1:3]),
         ("USER: Describe the drink in a few words. ASSISTANT:", [])]
N_NEW = 16


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  from vsd_jax.weights import load_target
  from vsd_jax.weights.tiny_llava import make_tiny_llava
  return load_target(make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava"))))


@pytest.fixture(scope="module")
def prompts(llava):
  """(ids int32 [3, P] right-padded, lens [3], pixel_values [3, 2, C, S, S] (blank padding; row 2 has none))."""
  rows = [prepare_prompt(llava.processor, t, im, name=f"row {i}") for i, (t, im) in enumerate(TEXTS)]
  p = max(len(r.input_ids) for r in rows)
  ids = np.zeros((3, p), np.int32)
  pixels = np.zeros((3, 2, 3, 42, 42), np.float32)
  for i, r in enumerate(rows):
    ids[i, :len(r.input_ids)] = r.input_ids
    if r.pixel_values is not None:
      pixels[i, :len(r.pixel_values)] = r.pixel_values
  return jnp.asarray(ids), jnp.asarray([len(r.input_ids) for r in rows], jnp.int32), jnp.asarray(pixels)


def _random(tree, seed, std=0.3):
  """Every leaf of `tree` random (norm scales 1 +- 0.1): weights large enough that each input moves the logits."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(lambda path, x: jnp.asarray(
      (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0) + std * rng.standard_normal(x.shape),
      x.dtype), tree)


def _drafts(llava, seed=1):
  """(draft with the adaptor, params: random draft weights and a fresh adaptor, the same draft without the adaptor,
  its params: the same minus the adaptor)."""
  cfg = Eagle3Config.from_target(llava.config, draft_vocab_size=llava.config.vocab_size, vision_adaptor=True)
  on = Eagle3Draft(cfg)
  params = nn.unbox(on.init(jax.random.PRNGKey(seed), embedding_matrix(llava.params), jnp.zeros((1, 2), jnp.int32),
                            jnp.zeros((1, 2, 3 * cfg.hidden_size)))["params"])
  body = _random({k: v for k, v in params.items() if k != "vision_adaptor"}, seed)
  return on, dict(body, vision_adaptor=params["vision_adaptor"]), Eagle3Draft(cfg.replace(vision_adaptor=False)), body


def _trained_adaptor(params, seed=2):
  """params with every adaptor weight random (fuse included, so the image vector moves the draft by O(1))."""
  return dict(params, vision_adaptor=_random(params["vision_adaptor"], seed))


def test_fresh_adaptor_is_the_plain_draft_and_text_rows_are_untouched(llava, prompts):
  """Switch on with fresh adaptor params: the TTT unroll's logits (step 0 over the sequence and the chain steps)
  equal the switch-off draft's with the same other params, though the image vectors are not zero. With a trained
  (random) adaptor the rows with images change and the row without images does not, and the chain steps of TTT and
  of VSD's paths fuse the vector of step 0."""
  from vsd_jax.methods.eagle3.loss import ttt_unroll
  from vsd_jax.methods.vsd.paths import unroll_draft_paths
  from vsd_jax.models.draft_unroll import sequence_step
  ids, lens, pixels = prompts
  valid = jnp.arange(ids.shape[1])[None, :] < lens[:, None]
  feats = jax.jit(target_pass, static_argnums=(0, 4))(llava.model, llava.params, ids, valid, 0, pixels).features
  on, params, off, params_off = _drafts(llava)
  embed = embedding_matrix(llava.params)
  unroll = jax.jit(ttt_unroll, static_argnums=(1, 5))
  want = unroll(params_off, off, embed, feats, ids, 3, valid)             # [3 steps, B, T, N]
  got = unroll(params, on, embed, feats, ids, 3, valid)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  vec = jax.jit(sequence_step, static_argnums=0)(on, params, embed, feats, ids, valid).image_vector
  assert vec.shape == (3, llava.config.hidden_size)
  assert np.abs(np.asarray(vec[:2])).min(axis=1).max() > 0 and np.all(np.asarray(vec[2]) == 0)

  trained = _trained_adaptor(params)
  moved = np.abs(np.asarray(unroll(trained, on, embed, feats, ids, 3, valid)) - np.asarray(want))
  text = np.asarray(valid & (ids != llava.config.image_token_id))
  for step in range(3):
    assert moved[step, 0][text[0]].max() > 1e-2 and moved[step, 1][text[1]].max() > 1e-2, step
    assert moved[step, 2].max() == 0, step

  # The chain steps (TTT's and VSD's paths, through draft_fn_of) fuse step 0's vector themselves: given step 0 with
  # its vector replaced by zeros, step 0's own outputs stay and every later step changes in the rows with images.
  s0 = jax.jit(sequence_step, static_argnums=0)(on, trained, embed, feats, ids, valid)
  blind = s0._replace(image_vector=jnp.zeros_like(s0.image_vector))
  ttt = [np.asarray(unroll(trained, on, embed, feats, ids, 3, valid, step0=x)) for x in (s0, blind)]
  anchors = (lens - 1)[:, None]                                                     # [B, 1]: after the prompt
  paths = jnp.asarray(np.random.default_rng(0).integers(5, 60, (3, 1, 2, 3)), jnp.int32)
  score = jax.jit(unroll_draft_paths, static_argnames=("draft_module", "num_paths", "depth"))
  d2t = jnp.zeros((llava.config.vocab_size,), jnp.int32)
  vsd = [np.asarray(score(trained, on, embed, feats, ids, valid, anchors, d2t, num_paths=2, depth=3, draft_ids=paths,
                          step0=x).logits) for x in (s0, blind)]                        # [B, 1, 2, K, N]
  np.testing.assert_array_equal(ttt[0][0], ttt[1][0])
  np.testing.assert_array_equal(vsd[0][..., 0, :], vsd[1][..., 0, :])                 # q_1 is step 0's
  for k in (1, 2):
    for row in (0, 1):
      assert np.abs(ttt[0][k, row] - ttt[1][k, row])[text[row]].max() > 1e-2, (k, row)
      assert np.abs(vsd[0][row, ..., k, :] - vsd[1][row, ..., k, :]).max() > 1e-2, (k, row)
    np.testing.assert_array_equal(ttt[0][k, 2], ttt[1][k, 2])
    np.testing.assert_array_equal(vsd[0][2, ..., k, :], vsd[1][2, ..., k, :])


def _config(method="eagle3"):
  from vsd_jax.config_base import base_config
  c = base_config()
  c.model.name = "tiny-llava-random"
  c.method = method
  c.draft.vision_adaptor, c.draft.vision_queries = True, 4
  c.draft.ttt_steps = 2
  c.train.lr, c.train.warmup_steps, c.mesh.data = 1e-2, 0, 1
  c.vsd.depth, c.vsd.num_paths, c.vsd.num_anchors, c.vsd.burn_in, c.vsd.mu = 2, 2, 2, 0, 0.0
  return c


def _batch(llava, prompts):
  """A training batch: the prompts plus 8 response tokens of the target's greedy decoding (loss on those)."""
  from vsd_jax.decoding.vanilla import generate
  ids, lens, pixels = prompts
  out = generate(llava.model, llava.params, ids, lens, jax.random.PRNGKey(0), 0.0, max_new_tokens=8,
                 cache_slots=ids.shape[1] + 8, pixel_values=pixels)
  b, p = ids.shape
  seq = np.zeros((b, p + 8), np.int32)
  loss = np.zeros((b, p + 8), np.int32)
  for r in range(b):
    n = int(lens[r])
    seq[r, :n], seq[r, n:n + 8] = np.asarray(ids[r, :n]), np.asarray(out.tokens[r])
    loss[r, n:n + 8] = 1
  return dict(input_ids=seq, loss_mask=loss, attention_mask=(np.arange(p + 8)[None] < (np.asarray(lens) + 8)[:, None]),
              pixel_values=np.asarray(pixels))


def _vocab(llava):
  v = llava.config.vocab_size
  return types.SimpleNamespace(d2t=np.zeros((v,), np.int32), t2d=np.ones((v,), bool))


@pytest.mark.slow
def test_a_train_step_reaches_the_adaptor(llava, prompts):
  """EAGLE-3's train step (trainer.MethodSteps): the first step moves only the zero-initialised fuse projection (the
  rest of the adaptor gets exactly zero gradient through it), the second moves every adaptor weight. VSD (method
  "vsd", its paths and oracle on the image prefix, no EAGLE-3 term): a finite gradient reaches every adaptor weight."""
  from vsd_jax import parallel
  from vsd_jax.methods import build_method
  from vsd_jax.training.trainer import MethodSteps
  batch = _batch(llava, prompts)
  c = _config()
  steps = MethodSteps(c, build_method(c, llava, _vocab(llava)), mesh=parallel.make_mesh(c, jax.devices()[:1]))
  before = jax.device_get(steps.state.params["vision_adaptor"])
  steps(batch)
  after_1 = jax.device_get(steps.state.params["vision_adaptor"])
  steps(batch)
  after_2 = jax.device_get(steps.state.params["vision_adaptor"])
  changed = lambda a, b: jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)  # noqa: E731
  first, second = changed(before, after_1), changed(before, after_2)
  assert first.pop("fuse") == {"kernel": True} and not any(jax.tree.leaves(first)), first
  assert all(jax.tree.leaves(second)), second

  c = _config("vsd")
  method = build_method(c, llava, _vocab(llava))
  params = _trained_adaptor(nn.unbox(method.init_params(jax.random.PRNGKey(0))))
  grads = jax.jit(jax.grad(lambda p: method.loss_fn(p, method.frozen, batch, jax.random.PRNGKey(1),
                                                    method.method_state)[0]))(params)
  norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads["vision_adaptor"])
  assert all(np.isfinite(n) and n > 0 for n in jax.tree.leaves(norms)), norms


def test_greedy_speculative_with_the_adaptor_equals_vanilla(llava, prompts):
  """T=0: speculative decoding with a draft whose (random) adaptor pools each prompt's images at the draft prefill
  and fuses the vector in every round gives vanilla multimodal decoding's tokens (rows with 1, 2 and no images)."""
  from vsd_jax.decoding.speculative import required_slots, speculative_generate
  from vsd_jax.decoding.tree import TreeConfig
  from vsd_jax.decoding.vanilla import generate
  ids, lens, pixels = prompts
  on, params, _, _ = _drafts(llava)
  tree = TreeConfig(depth=3, top_k=3, total_tokens=8, mode="tree")
  ref = generate(llava.model, llava.params, ids, lens, jax.random.PRNGKey(0), 0.0, max_new_tokens=N_NEW,
                 cache_slots=ids.shape[1] + N_NEW, pixel_values=pixels)
  out = speculative_generate(llava.model, llava.params, on, _trained_adaptor(params),
                             jnp.zeros((llava.config.vocab_size,), jnp.int32), ids, lens, jax.random.PRNGKey(0),
                             tree_cfg=tree, max_new_tokens=N_NEW,
                             cache_slots=required_slots(ids.shape[1], N_NEW, tree), pixel_values=pixels)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(out.num_new), np.asarray(ref.num_new))


def test_save_load_init_from_and_export(llava, tmp_path):
  """draft_io round trip (config and every adaptor weight); a run with the adaptor starting from a text-stage draft
  without it keeps the loaded weights and a fresh (zero-fuse) adaptor, and the reverse is refused; the EAGLE-3
  export refuses a draft with the adaptor, naming it."""
  from vsd_jax.methods import build_method
  from vsd_jax.weights.draft_io import DraftMismatchError, load_draft, save_draft
  from vsd_jax.weights.eagle3_format import Eagle3FormatError, export_eagle3
  on, params, off, params_off = _drafts(llava)
  params = _trained_adaptor(params)
  v = _vocab(llava)
  save_draft(str(tmp_path / "with"), on.cfg, params, v.d2t, v.t2d, llava.config)
  cfg, loaded, _, _ = load_draft(str(tmp_path / "with"), llava.config)
  assert cfg == on.cfg and cfg.vision_adaptor and cfg.vision_queries == 4 and cfg.image_token_id == 4
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  save_draft(str(tmp_path / "text_stage"), off.cfg, params_off, v.d2t, v.t2d, llava.config)
  c = _config()
  c.draft.init_from = str(tmp_path / "text_stage")
  start = nn.unbox(build_method(c, llava, v).init_params(jax.random.PRNGKey(5)))
  for k in params_off:
    for a, b in zip(jax.tree.leaves(start[k]), jax.tree.leaves(params_off[k])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.any(np.asarray(start["vision_adaptor"]["fuse"]["kernel"]))
  c.draft.init_from, c.draft.vision_adaptor = str(tmp_path / "with"), False
  with pytest.raises(DraftMismatchError, match="it has a vision adaptor: set draft.vision_adaptor=True"):
    build_method(c, llava, v).init_params(jax.random.PRNGKey(5))

  with pytest.raises(Eagle3FormatError, match=r"has a vision adaptor .*no place for it.*vision_adaptor=False"):
    export_eagle3(str(tmp_path / "with"), str(tmp_path / "exported"))
  assert not (tmp_path / "exported").exists()


def test_adaptor_with_a_text_target_is_an_error(llava, prompts):
  """Text targets have no image positions: the switch on is an error naming it (config and Eagle3Config), and a
  draft with the adaptor refuses to decode for a text target (here the tiny LLaVA's own language model)."""
  from vsd_jax.decoding.speculative import speculative_generate
  from vsd_jax.decoding.tree import TreeConfig
  from vsd_jax.methods import build_method
  from vsd_jax.models.features import language_model_params
  from vsd_jax.models.llama import LlamaForCausalLM
  text_target = types.SimpleNamespace(config=llava.config.text, params=language_model_params(llava.params),
                                      model=LlamaForCausalLM(llava.config.text))
  c = _config()
  c.model.name = "smollm2-135m-instruct"
  with pytest.raises(ValueError, match=r"vision_adaptor=True needs a multimodal \(LLaVA\) target.*"
                                       r"'smollm2-135m-instruct' is a text model.*vision_adaptor=False"):
    build_method(c, text_target, _vocab(llava))
  with pytest.raises(ValueError, match="vision_adaptor=True needs a multimodal target"):
    Eagle3Config.from_target(llava.config.text, vision_adaptor=True)
  on, params, _, _ = _drafts(llava)
  ids, lens, _ = prompts
  with pytest.raises(ValueError, match="draft has a vision adaptor for image token 4 but the target is a text model"):
    speculative_generate(text_target.model, text_target.params, on, params,
                         jnp.zeros((llava.config.vocab_size,), jnp.int32), ids, lens,
                         jax.random.PRNGKey(0), tree_cfg=TreeConfig(depth=2, top_k=2, total_tokens=4),
                         max_new_tokens=4, cache_slots=256)


def test_tiny_adaptor_config():
  """configs/llava.py:tiny-adaptor is :tiny with the adaptor on, in its own workdir; the switch is off by default."""
  import importlib.util
  import os
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("llava_cfg", os.path.join(repo, "configs", "llava.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  plain, adaptor = mod.get_config("tiny"), mod.get_config("tiny-adaptor")
  assert not plain.draft.vision_adaptor and not mod.get_config("7b").draft.vision_adaptor
  assert adaptor.draft.vision_adaptor and adaptor.draft.vision_queries == 4
  assert adaptor.workdir != plain.workdir and adaptor.data.sources == plain.data.sources

"""LLaVA (models/llava.py, models/clip.py) against transformers' LlavaForConditionalGeneration on the same weights:
a tiny random llava-hf checkpoint made locally (tests/tiny_hf_llava.py), images from matplotlib's bundled samples
(matplotlib is a dependency) prepared by the checkpoint's own processor (vsd_jax/data/images.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.multidevice import needs_8_devices
from tests.tiny_hf_llava import IMAGE_SIZE, SAMPLES, WORDS, make_hf_llava, make_processor, save_llava
from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.masks import decode_mask, positions_from_mask, sequence_mask

torch = pytest.importorskip("torch")

TOL = 1e-4


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llava")
  return save_llava(make_hf_llava(), path)


@pytest.fixture(scope="module")
def hf_model(llava_dir):
  from transformers import LlavaForConditionalGeneration
  return LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def target(llava_dir):
  from vsd_jax.weights import load_target
  return load_target(llava_dir)


@pytest.fixture(scope="module")
def forward():
  """(model, params, ids, pixel_values, hidden_layers, other LlavaForConditionalGeneration kwargs) -> LlamaOutput."""
  return jax.jit(lambda model, p, ids, px, layers, kw: model.apply({"params": p}, ids, pixel_values=px,
                                                                   hidden_layers=layers, **kw),
                 static_argnums=(0, 4))


def _hf(hf_model, ids, pixels=None, mask=None, **kw):
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(np.asarray(ids, np.int64)),
                    pixel_values=None if pixels is None else torch.tensor(pixels),
                    attention_mask=None if mask is None else torch.tensor(np.asarray(mask, np.int64)), **kw)


def _ours(forward, target, ids, pixels=None, hidden_layers=(), **kw):
  return forward(target.model, target.params, jnp.asarray(ids, jnp.int32),
                 None if pixels is None else jnp.asarray(pixels), tuple(hidden_layers), kw)


PROMPTS = {  # name: (text, images)
    "text only": ("USER : what is in the picture ? ASSISTANT :", []),
    "one image": ("USER : <image>\nwhat is in this picture ? ASSISTANT :", SAMPLES[:1]),
    "two images": ("USER : <image> first , <image> second . compare the two images ? ASSISTANT :", SAMPLES[1:]),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_transformers(target, hf_model, forward, name):
  from vsd_jax.data.images import prepare_prompt
  text, images = PROMPTS[name]
  p = prepare_prompt(target.processor, text, images, name=name)
  n_img = (p.input_ids == target.config.image_token_id).sum()
  assert n_img == len(images) * target.config.num_image_tokens == len(images) * 9
  assert (p.pixel_values is None) == (not images)
  ids = p.input_ids[None]
  ours = np.asarray(_ours(forward, target, ids, p.pixel_values).logits)[0]
  ref = _hf(hf_model, ids, p.pixel_values).logits[0].numpy()
  assert ours.shape == ref.shape == (len(p.input_ids), 64)
  err = np.abs(ours - ref).max()
  print(f"{name}: max |ours - transformers| = {err:.2e} (logits up to {np.abs(ref).max():.1f})")
  assert err <= TOL, err
  if images:  # the images matter: other pixels give other logits, by far more than the tolerance
    other = np.asarray(_ours(forward, target, ids, p.pixel_values[::-1] * 0.5).logits)[0]
    assert np.abs(other - ours).max() > 100 * TOL


def test_padded_batch_with_different_image_counts(target, hf_model, forward):
  """Two right-padded rows with 2 and 1 images: features fill the batch's image tokens row by row (HF order)."""
  from vsd_jax.data.images import prepare_prompt
  rows = [prepare_prompt(target.processor, *PROMPTS["two images"]),
          prepare_prompt(target.processor, *PROMPTS["one image"])]
  t = max(len(r.input_ids) for r in rows)
  ids = np.full((2, t), WORDS.index("<pad>"), np.int32)
  valid = np.zeros((2, t), bool)
  for i, r in enumerate(rows):
    ids[i, :len(r.input_ids)], valid[i, :len(r.input_ids)] = r.input_ids, True
  pixels = np.concatenate([r.pixel_values for r in rows])
  ours = np.asarray(_ours(forward, target, ids, pixels, positions=positions_from_mask(jnp.asarray(valid)),
                          attention_mask=sequence_mask(jnp.asarray(valid), t)).logits)
  ref = _hf(hf_model, ids, pixels, mask=valid).logits.numpy()
  err = np.abs(ours - ref)[valid].max()
  print(f"padded batch: max |ours - transformers| = {err:.2e}")
  assert err <= TOL, err


def test_cached_decoding_and_hidden_states_after_image_prefill(target, hf_model, forward):
  """Prefill with an image into a KV cache, then decode text tokens one at a time with no pixels: every logit
  equals transformers' full forward over prompt + continuation, and the hidden states the EAGLE-3 draft reads
  (the language model's layer inputs) equal transformers' at every layer."""
  from vsd_jax.data.images import prepare_prompt
  p = prepare_prompt(target.processor, *PROMPTS["one image"])
  cont = [WORDS.index(w) for w in ("a", "person", ".")]
  full = np.concatenate([p.input_ids, cont])[None]
  ref = _hf(hf_model, full, p.pixel_values, output_hidden_states=True)
  n, slots, cfg = len(p.input_ids), len(p.input_ids) + 8, target.config
  cache = KVCache.zeros(cfg, 1, slots)  # LlavaConfig reads as its language model's config
  out = _ours(forward, target, p.input_ids[None], p.pixel_values, hidden_layers=range(cfg.num_layers),
              kv_cache=cache, attention_mask=sequence_mask(jnp.ones((1, n), bool), slots),
              write_index=jnp.zeros((1,), jnp.int32))
  assert np.abs(np.asarray(out.logits[0]) - ref.logits[0, :n].numpy()).max() <= TOL
  for i in range(cfg.num_layers):
    err = np.abs(np.asarray(out.hidden_states[i, 0]) - ref.hidden_states[i][0, :n].numpy()).max()
    assert err <= TOL, (i, err)
  cache = out.kv_cache
  for j, tok in enumerate(cont):
    pos = jnp.asarray([n + j], jnp.int32)
    step = _ours(forward, target, [[tok]], None, kv_cache=cache, positions=pos[:, None],
                 attention_mask=decode_mask(pos, slots), write_index=pos)
    cache = step.kv_cache
    err = np.abs(np.asarray(step.logits[0, 0]) - ref.logits[0, n + j].numpy()).max()
    assert err <= TOL, (j, err)


def test_text_only_call_is_the_language_model(target):
  """A text-only call of the LLaVA model is the bare language model on its parameters."""
  from vsd_jax.models.llama import LlamaForCausalLM
  ids = jnp.asarray([[5, 7, 8, 9, 10, 11]], jnp.int32)
  lm = LlamaForCausalLM(target.config.text)
  a, b = jax.jit(lambda p: (target.model.apply({"params": p}, ids).logits,
                            lm.apply({"params": p["language_model"]}, ids).logits))(target.params)
  np.testing.assert_array_equal(a, b)
  feats = jax.eval_shape(lambda p, x: target.model.apply({"params": p}, x, method="image_features"),
                         target.params, jax.ShapeDtypeStruct((2, 3, IMAGE_SIZE, IMAGE_SIZE), jnp.float32))
  assert feats.shape == (2, target.config.num_image_tokens, target.config.text.hidden_size) == (2, 9, 32)


def _rename_checkpoint(src, dst, rename):
  from safetensors.numpy import load_file, save_file
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file({rename(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
  for f in os.listdir(src):
    if f.endswith(".json"):
      with open(os.path.join(src, f)) as a, open(os.path.join(dst, f), "w") as b:
        b.write(a.read())
  return dst


# The spellings of llava-hf tensor names across transformers versions (convert._LLAVA_RENAMES), from the
# transformers-5 save (language_model.model.*, vision_tower.*).
NAMINGS = {
    "llava-hf original (<4.52)": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1),
    "transformers 4.52+": lambda k: (
        k.replace("language_model.model.", "model.language_model.", 1).replace("language_model.lm_head", "lm_head")
        .replace("vision_tower.", "model.vision_tower.vision_model.", 1)
        .replace("multi_modal_projector.", "model.multi_modal_projector.", 1)),
}


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_checkpoint_namings_load_the_same_params(llava_dir, target, tmp_path, naming):
  from vsd_jax.weights import load_target
  d = _rename_checkpoint(llava_dir, str(tmp_path / "renamed"), NAMINGS[naming])
  other = load_target(d, with_tokenizer=False)
  assert jax.tree.structure(other.params) == jax.tree.structure(target.params)
  for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(target.params)):
    np.testing.assert_array_equal(a, b)


def test_tied_head_unscanned_and_full_strategy(tmp_path, forward):
  """tie_word_embeddings, scan_layers=False (per-layer params) and vision_feature_select_strategy='full' with a
  list of feature layers (CLS kept, two layers concatenated) also match transformers."""
  from vsd_jax.weights import load_target
  hf = make_hf_llava(seed=1, tie=True, vision_feature_select_strategy="full", vision_feature_layer=[-3, -1])
  d = save_llava(hf, tmp_path / "variant")
  t = load_target(d, scan_layers=False, with_tokenizer=False)
  assert t.config.text.tie_word_embeddings and t.config.num_image_tokens == 10
  assert "layers_0" in t.params["vision_tower"] and "layers_0" in t.params["language_model"]
  from vsd_jax.data.images import open_image, resolve_image_path
  proc = make_processor()
  pixels = proc.image_processor(images=[open_image(resolve_image_path(SAMPLES[0]))], return_tensors="np")
  pixels = np.asarray(pixels["pixel_values"], np.float32)
  ids = np.array([[5, 7] + [WORDS.index("<image>")] * 10 + [8, 9, 12, 13, 14]])
  ours = np.asarray(forward(t.model, t.params, jnp.asarray(ids), jnp.asarray(pixels), (), {}).logits)
  ref = _hf(hf, ids, pixels).logits.numpy()
  assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()
  u = load_target(d, scan_layers=False, with_tokenizer=False, untie_lm_head=True)  # decoding's CPU layout
  assert not u.config.text.tie_word_embeddings and "lm_head" in u.params["language_model"]
  untied = np.asarray(forward(u.model, u.params, jnp.asarray(ids), jnp.asarray(pixels), (), {}).logits)
  assert np.abs(untied - ref).max() <= TOL, np.abs(untied - ref).max()


@needs_8_devices
def test_sharded_load_matches(llava_dir, target):
  """load_target(mesh=...) places LLaVA's parameters (vision tower and projector too) straight into shardings."""
  from vsd_jax import parallel
  from vsd_jax.config_base import base_config
  from vsd_jax.weights import load_target
  c = base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  mesh = parallel.make_mesh(c, jax.devices()[:8])
  t = load_target(llava_dir, with_tokenizer=False, mesh=mesh, rules=parallel.logical_axis_rules(c))
  k = t.params["vision_tower"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert k.sharding.shard_shape(k.shape) != k.shape  # split over fsdp x tensor
  for a, b in zip(jax.tree.leaves(t.params), jax.tree.leaves(target.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_defaults_follow_transformers():
  """A config.json that leaves fields out (as llava-hf's do) means what transformers makes of it."""
  from transformers import LlavaConfig as HFLlavaConfig
  from vsd_jax.weights.convert import llava_config_from_hf_dict
  hub_7b = {  # llava-hf/llava-1.5-7b-hf's config.json (text_config lists only what differs from LLaMA's defaults)
      "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
      "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                      "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                      "torch_dtype": "float16", "vocab_size": 32064},
      "tie_word_embeddings": False, "torch_dtype": "float16",
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
  # No vision_config: LLaVA-1.5's ViT-L/14-336 (transformers' own LlavaConfig() default has image_token_index 32000 =
  # vocab_size, a token that cannot be embedded: our LlavaConfig refuses it, hence the vocabulary here).
  for d in (hub_7b, {"model_type": "llava", "text_config": {"vocab_size": 32002}}):
    ours = llava_config_from_hf_dict(json.loads(json.dumps(d)))
    ref = HFLlavaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    t, v = ref.text_config, ref.vision_config
    assert (ours.text.vocab_size, ours.text.hidden_size, ours.text.intermediate_size, ours.text.num_layers,
            ours.text.num_heads, ours.text.num_kv_heads, ours.text.max_position_embeddings,
            ours.text.rms_norm_eps, ours.text.rope_theta, ours.text.tie_word_embeddings) == (
        t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
        t.num_key_value_heads, t.max_position_embeddings, t.rms_norm_eps, t.rope_parameters["rope_theta"],
        ref.tie_word_embeddings)
    assert (ours.vision.hidden_size, ours.vision.intermediate_size, ours.vision.num_layers, ours.vision.num_heads,
            ours.vision.image_size, ours.vision.patch_size, ours.vision.num_channels, ours.vision.layer_norm_eps,
            ours.vision.hidden_act) == (
        v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size,
        v.patch_size, v.num_channels, v.layer_norm_eps, v.hidden_act)
    assert (ours.image_token_id, ours.vision_feature_layer, ours.vision_feature_select_strategy,
            ours.projector_hidden_act, ours.projector_bias) == (
        ref.image_token_index, ref.vision_feature_layer, ref.vision_feature_select_strategy,
        ref.projector_hidden_act, ref.multimodal_projector_bias)
  assert ours.feature_layers == (23,) and ours.num_image_tokens == 576
  # The language model's fields read through; replace() routes them to it.
  assert (ours.num_layers, ours.vocab_size, ours.eagle3_layers) == (32, 32002, (2, 16, 29))
  assert not ours.replace(scan_layers=False).text.scan_layers
  assert llava_config_from_hf_dict(dict(hub_7b, vision_feature_layer=[-3, -2])).vision_feature_layer == (-3, -2)


def test_registry_names_llava():
  from vsd_jax.weights.registry import REGISTRY
  assert REGISTRY["llava-1.5-7b"] == ("hub", "llava-hf/llava-1.5-7b-hf")
  assert REGISTRY["llava-1.5-13b"] == ("hub", "llava-hf/llava-1.5-13b-hf")

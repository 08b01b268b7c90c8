"""The one table from HF LLaMA-family tensor names (LLaMA, Mistral, Qwen2/2.5, Qwen3) to our Flax parameter tree.

Every loader (GGUF, safetensors, PyTorch .bin) produces HF-named float numpy arrays in torch layout
([out, in] for linear weights) and hands them to `params_from_hf` (whole tensors, host numpy) or
`params_from_hf_sharded` (blocks of tensors, straight into each parameter's sharding on a mesh).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from vsd_jax.models.clip import ClipVisionConfig
from vsd_jax.models.llama import LlamaConfig
from vsd_jax.models.llava import LlavaConfig

# (HF name inside model.layers.{i}., our path under "layers", transpose linear weight?)
_LAYER_TABLE = (
    ("input_layernorm.weight", ("input_layernorm", "scale"), False),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
)
# Entries only some architectures have: (LlamaConfig flag, HF name inside model.layers.{i}., our path, transpose?)
_OPTIONAL_LAYER_TABLE = (
    ("qkv_bias", "self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), False),   # Qwen2/2.5
    ("qkv_bias", "self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), False),
    ("qkv_bias", "self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), False),
    ("qk_norm", "self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), False),  # Qwen3
    ("qk_norm", "self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), False),
)


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where one Flax parameter comes from: HF tensor name(s) and the layout change.

  hf_names: one name, or (stacked) one per layer, stacked on a leading [L] axis.
  transpose: reverse the axes: HF linear weights are [out, in], Flax kernels [in, out] (and CLIP's patch
    convolution [out, C, kh, kw] is read as [kw, kh, C, out], models/clip.py).
  """
  hf_names: tuple
  transpose: bool
  stacked: bool


def param_sources(cfg: LlamaConfig, has: Callable[[str], bool]) -> dict:
  """The name table as {Flax path (tuple of keys): ParamSource}, for every parameter of LlamaForCausalLM(cfg).

  Layers are stacked on a leading axis [L, ...] when cfg.scan_layers, else stored as layers_{i}.
  HF layout needs no q/k permutation (our RoPE is HF's rotate-half); GGUF loaders undo llama.cpp's before.
  A LlavaConfig gives LlavaForConditionalGeneration's table (`llava_param_sources`).
  """
  if not isinstance(cfg, LlamaConfig):
    return llava_param_sources(cfg, has)
  sources = {("embed_tokens", "embedding"): ParamSource(("model.embed_tokens.weight",), False, False),
             ("norm", "scale"): ParamSource(("model.norm.weight",), False, False)}
  if not cfg.tie_word_embeddings:
    if not has("lm_head.weight"):
      raise ValueError("checkpoint has no lm_head.weight but the config says tie_word_embeddings=False")
    sources[("lm_head", "kernel")] = ParamSource(("lm_head.weight",), True, False)
  layer_table = _LAYER_TABLE + tuple(row[1:] for row in _OPTIONAL_LAYER_TABLE if getattr(cfg, row[0]))
  for hf_name, path, transpose in layer_table:
    names = tuple(f"model.layers.{i}.{hf_name}" for i in range(cfg.num_layers))
    if cfg.scan_layers:
      sources[("layers",) + path] = ParamSource(names, transpose, True)
    else:
      for i, name in enumerate(names):
        sources[(f"layers_{i}",) + path] = ParamSource((name,), transpose, False)
  return sources


def cast(x: np.ndarray, dtype) -> np.ndarray:
  """float32 (or any float) numpy -> numpy of `dtype` (bfloat16 through ml_dtypes, round to nearest even)."""
  return np.asarray(x, np.float32).astype(np.dtype(dtype))


def read_param(src: ParamSource, get_slice: Callable[[str, tuple], np.ndarray], index: tuple, dtype) -> np.ndarray:
  """The block `index` of one parameter in Flax layout, as numpy of `dtype`.

  index: one slice per axis of the Flax parameter (what jax.make_array_from_callback passes), or () = all of it.
  get_slice(hf_name, hf_index) returns that block of the HF tensor (float numpy; hf_index () = whole). Only the
  requested block is asked for: a transposed kernel asks for the transposed block, a stacked parameter for
  the requested layers only, each layer's block copied into the output as it is read.
  """
  index = tuple(index)
  names, rest = (src.hf_names[index[0] if index else slice(None)], index[1:]) if src.stacked else \
      (src.hf_names, index)
  hf_index = rest[::-1] if src.transpose else rest  # transposed parameters are 2-D ([in, out] <- [out, in])

  def one(name):
    w = get_slice(name, hf_index)
    return cast(w.T if src.transpose else w, dtype)

  if not src.stacked:
    return one(names[0])
  first = one(names[0])
  out = np.empty((len(names),) + first.shape, first.dtype)
  out[0] = first
  for i, name in enumerate(names[1:], 1):
    out[i] = one(name)
  return out


def params_from_hf(cfg: LlamaConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> dict:
  """Build the Flax params pytree (numpy, cfg.param_dtype) from HF-named tensors (whole tensors in host memory).

  Layers are stacked on a leading axis [L, ...] when cfg.scan_layers, else stored as layers_{i}.
  """
  params: dict = {}
  for path, src in param_sources(cfg, has).items():
    _set(params, path, read_param(src, lambda n, i: get(n)[i], (), cfg.jnp_param_dtype))
  return params


def params_from_hf_sharded(cfg: LlamaConfig, get_slice: Callable[[str, tuple], np.ndarray],
                           has: Callable[[str], bool], abstract: Any, whole_params: bool = False) -> dict:
  """The Flax params pytree as jax.Arrays built straight into their shardings, one device block at a time.

  abstract: the params pytree as jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding) leaves
    (parallel.model_abstract_params). Each parameter is `jax.make_array_from_callback(shape, sharding, cb)`,
    where cb reads only its device's block through get_slice(hf_name, hf_index) (read_param), so host memory
    holds this process's blocks of one parameter at a time, never the model or a whole sharded tensor.
  whole_params: read each parameter whole once and hand out its blocks (for sources that cannot read a block
    cheaper than the tensor, e.g. quantised GGUF tensors dequantised per tensor on host).
  """
  sources = param_sources(cfg, has)
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
  paths = {tuple(k.key for k in kp): leaf for kp, leaf in flat}
  if set(paths) != set(sources):
    raise ValueError(f"the model's parameters and the checkpoint table differ: model only "
                     f"{sorted(set(paths) - set(sources))}, table only {sorted(set(sources) - set(paths))}")
  params: dict = {}
  for path, a in paths.items():
    src, cache = sources[path], {}

    def block(index, src=src, a=a, cache=cache):
      if whole_params:
        if "whole" not in cache:
          cache["whole"] = read_param(src, get_slice, (), a.dtype)
        return cache["whole"][tuple(index)]
      # Devices holding the same block (replicated axes) share one read.
      key = tuple((s.start, s.stop, s.step) for s in index)
      if key not in cache:
        cache[key] = read_param(src, get_slice, index, a.dtype)
      return cache[key]

    _set(params, path, jax.make_array_from_callback(a.shape, a.sharding, block))
  return params


# config.json model_type -> the LlamaConfig fields that architecture fixes. (Qwen3's head_dim defaults to 128 in
# transformers' Qwen3Config, not hidden_size // heads; Mistral's sliding_window to 4096 when the key is absent.)
HF_ARCHITECTURES = {
    "llama": dict(),
    "mistral": dict(),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
}


def config_from_hf_dict(d: dict, **overrides) -> LlamaConfig:
  """LlamaConfig from an HF config.json dict (model_type llama, mistral, qwen2 or qwen3: LLaMA 1/2/3, Vicuna,
  SmolLM2, Mistral, Qwen2/2.5, Qwen3 dense, the DeepSeek-R1 distills)."""
  model_type = d.get("model_type", "llama")
  if model_type not in HF_ARCHITECTURES:
    raise ValueError(f"config.json model_type={model_type!r} is not a supported architecture; supported: "
                     f"{', '.join(sorted(HF_ARCHITECTURES))} (and 'llava' for LLaVA-1.5)")
  for flag in ("attention_bias", "mlp_bias"):
    if d.get(flag) and not (flag == "attention_bias" and model_type == "qwen2"):
      raise ValueError(f"config.json sets {flag}=true ({model_type}): biases there are not supported")
  if d.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
  if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
    raise ValueError(f"config.json ({model_type}) sets use_sliding_window=true: per-layer sliding windows "
                     "(max_window_layers) are not supported; only Mistral's window on every layer is")
  rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", rope.get("type"))
  theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
  eos = d.get("eos_token_id", 2)
  heads = d["num_attention_heads"]
  head_dim = d.get("head_dim") or (128 if model_type == "qwen3" else d["hidden_size"] // heads)
  kw = dict(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads", heads),
      head_dim=head_dim, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta), max_position_embeddings=d.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), bos_token_id=d.get("bos_token_id", 1),
      eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,), **HF_ARCHITECTURES[model_type])
  if model_type == "mistral":
    kw["sliding_window"] = d.get("sliding_window", 4096)
  if rope_type == "llama3":
    kw.update(rope_scaling_type="llama3", rope_scaling_factor=float(rope["factor"]),
              rope_low_freq_factor=float(rope["low_freq_factor"]),
              rope_high_freq_factor=float(rope["high_freq_factor"]),
              rope_original_max_position=int(rope["original_max_position_embeddings"]))
  elif rope_type not in (None, "default"):
    raise ValueError(f"rope scaling {rope_type!r} is not supported (supported: default, llama3)")
  kw.update(overrides)
  return LlamaConfig(**kw)


# ---- LLaVA (llava-hf checkpoints): the LLaMA table above for the language model, plus the vision tower and the
# projector. Checkpoint names differ across transformers versions; `llava_canonical_name` maps each to one
# spelling: the LLaMA names above (model.layers.*, lm_head.weight) for the language model,
# vision_tower.<CLIPVisionTransformer name> and multi_modal_projector.* for the rest.
#   llava-hf originals, transformers < 4.52:  language_model.model.*, language_model.lm_head.weight,
#                                             vision_tower.vision_model.*, multi_modal_projector.*
#   transformers 4.52 .. 4.x:                 model.language_model.*, lm_head.weight,
#                                             model.vision_tower.vision_model.*, model.multi_modal_projector.*
#   transformers 5 save_pretrained:           language_model.model.*, language_model.lm_head.weight,
#                                             vision_tower.* (no vision_model.), multi_modal_projector.*
_LLAVA_RENAMES = (
    (r"^model\.language_model\.", "model."),
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)

# (HF name under vision_tower., our path under "vision_tower", transpose?)
_CLIP_TABLE = (
    ("embeddings.class_embedding", ("embeddings", "class_embedding"), False),
    ("embeddings.patch_embedding.weight", ("embeddings", "patch_embedding"), True),
    ("embeddings.position_embedding.weight", ("embeddings", "position_embedding"), False),
    ("pre_layrnorm.weight", ("pre_layrnorm", "scale"), False),
    ("pre_layrnorm.bias", ("pre_layrnorm", "bias"), False),
)
# (HF name under vision_tower.encoder.layers.{i}., our path under "layers", transpose?)
_CLIP_LAYER_TABLE = (
    ("layer_norm1.weight", ("layer_norm1", "scale"), False),
    ("layer_norm1.bias", ("layer_norm1", "bias"), False),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), False),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), False),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True),
    ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), False),
    ("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), True),
    ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), False),
    ("layer_norm2.weight", ("layer_norm2", "scale"), False),
    ("layer_norm2.bias", ("layer_norm2", "bias"), False),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), True),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), False),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), True),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), False),
)


def llava_canonical_name(name: str) -> str:
  """A llava-hf checkpoint tensor name (any transformers version's spelling) -> the one the table uses."""
  for pattern, repl in _LLAVA_RENAMES:
    if re.match(pattern, name):
      return re.sub(pattern, repl, name, count=1)
  return name


def llava_param_sources(cfg, has: Callable[[str], bool]) -> dict:
  """{Flax path: ParamSource} for LlavaForConditionalGeneration(cfg) (a models.llava.LlavaConfig), in canonical
  names (`llava_canonical_name`). Only the vision layers the model reads are listed (clip.ClipVisionTower)."""
  sources = {("language_model",) + path: src for path, src in param_sources(cfg.text, has).items()}
  for hf_name, path, transpose in _CLIP_TABLE:
    sources[("vision_tower",) + path] = ParamSource((f"vision_tower.{hf_name}",), transpose, False)
  depth = max(cfg.feature_layers)
  for hf_name, path, transpose in _CLIP_LAYER_TABLE:
    names = tuple(f"vision_tower.encoder.layers.{i}.{hf_name}" for i in range(depth))
    if cfg.vision.scan_layers:
      sources[("vision_tower", "layers") + path] = ParamSource(names, transpose, True)
    else:
      for i, name in enumerate(names):
        sources[("vision_tower", f"layers_{i}") + path] = ParamSource((name,), transpose, False)
  for layer in ("linear_1", "linear_2"):
    sources[("multi_modal_projector", layer, "kernel")] = ParamSource(
        (f"multi_modal_projector.{layer}.weight",), True, False)
    if cfg.projector_bias:
      sources[("multi_modal_projector", layer, "bias")] = ParamSource(
          (f"multi_modal_projector.{layer}.bias",), False, False)
  return sources


# What a config.json field left out means: transformers' defaults (llava-hf's text_config lists only the fields
# that differ from LlamaConfig's, e.g. llava-1.5-7b-hf's has no hidden_size). Checked against transformers in
# tests/test_llava.py.
HF_LLAMA_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                               layer_norm_eps=1e-5)
# LlavaConfig's vision_config when config.json has none: CLIP ViT-L/14 at 336 px.
HF_LLAVA_VISION_DEFAULTS = dict(HF_CLIP_VISION_DEFAULTS, hidden_size=1024, intermediate_size=4096, patch_size=14,
                                image_size=336, num_hidden_layers=24, num_attention_heads=16)
# Overrides (load_target's **config_overrides) that apply to the vision tower too; all go to the language model.
_VISION_OVERRIDES = ("dtype", "param_dtype", "scan_layers")


def llava_config_from_hf_dict(d: dict, **overrides):
  """models.llava.LlavaConfig from a llava-hf config.json dict. overrides: LlamaConfig fields for the language
  model; dtype, param_dtype and scan_layers also set the vision tower's."""
  if d.get("model_type") != "llava":
    raise ValueError(f"model_type={d.get('model_type')!r} is not 'llava'")
  v = d.get("vision_config")
  v = dict(HF_LLAVA_VISION_DEFAULTS) if v is None else {**HF_CLIP_VISION_DEFAULTS, **v}
  if v.get("model_type", "clip_vision_model") != "clip_vision_model":
    raise ValueError(f"vision_config.model_type={v['model_type']!r}: only CLIP vision towers (LLaVA-1.5's "
                     "'clip_vision_model') are supported")
  vision = ClipVisionConfig(
      hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
      num_heads=v["num_attention_heads"], image_size=v["image_size"], patch_size=v["patch_size"],
      num_channels=v["num_channels"], layer_norm_eps=float(v["layer_norm_eps"]), hidden_act=v["hidden_act"],
      **{k: overrides[k] for k in _VISION_OVERRIDES if k in overrides})
  t = {**HF_LLAMA_DEFAULTS, **(d.get("text_config") or {})}
  text = config_from_hf_dict(t, **overrides)
  if d.get("tie_word_embeddings") and not text.tie_word_embeddings:  # LlavaConfig ties if either says so
    text = text.replace(tie_word_embeddings=True)
  layer = d.get("vision_feature_layer", -2)
  return LlavaConfig(
      text=text, vision=vision, image_token_id=int(d.get("image_token_index", d.get("image_token_id", 32000))),
      vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
      vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
      projector_hidden_act=d.get("projector_hidden_act", "gelu"),
      projector_bias=bool(d.get("multimodal_projector_bias", True)))


# ---- The other direction, for checkpoints made here (a random tiny LLaVA, weights/tiny_llava.py): the same table
# read backwards, so a saved directory loads through the one path every checkpoint takes.

def hf_tensors_from_params(cfg, params) -> dict:
  """{canonical HF name: float32 numpy in torch layout} of a Flax params pytree (LlamaConfig or LlavaConfig),
  every ParamSource of `param_sources` inverted (stacked layers split, kernels transposed back)."""
  tensors = {}
  for path, src in param_sources(cfg, lambda name: True).items():
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value, np.float32)
    for name, w in (zip(src.hf_names, value) if src.stacked else [(src.hf_names[0], value)]):
      tensors[name] = np.ascontiguousarray(w.T if src.transpose else w)
  return tensors


def llava_hf_name(canonical: str) -> str:
  """A canonical name (`llava_canonical_name`) -> transformers 5's llava-hf spelling (language_model.model.*,
  language_model.lm_head.*, vision_tower.*, multi_modal_projector.*)."""
  if canonical.startswith("model."):
    return "language_model." + canonical
  if canonical.startswith("lm_head."):
    return "language_model." + canonical
  return canonical


def hf_config_dict(cfg: LlamaConfig) -> dict:
  """An HF config.json dict of a text LlamaConfig (`config_from_hf_dict` reads it back): model_type "qwen3" with
  q/k norms, "qwen2" with q/k/v biases, "mistral" with a sliding window, else "llama". Rope scaling is not written."""
  if cfg.rope_scaling_type is not None:
    raise ValueError("hf_config_dict: rope scaling is not written (the checkpoints made here have none)")
  model_type = ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else
                "mistral" if cfg.sliding_window is not None else "llama")
  if sum((cfg.qk_norm, cfg.qkv_bias, cfg.sliding_window is not None)) > 1:
    raise ValueError(f"hf_config_dict: no HF architecture has all of qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias},"
                     f" sliding_window={cfg.sliding_window}")
  d = dict(model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
           intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
           num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
           rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
           tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
           eos_token_id=list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0])
  if model_type == "mistral":
    d["sliding_window"] = cfg.sliding_window
  return d


def llava_hf_config_dict(cfg) -> dict:
  """A llava-hf config.json dict for a models.llava.LlavaConfig (`llava_config_from_hf_dict` reads it back)."""
  t, v = cfg.text, cfg.vision
  text = hf_config_dict(t)
  vision = dict(model_type="clip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                patch_size=v.patch_size, num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps,
                hidden_act=v.hidden_act)
  layer = cfg.vision_feature_layer
  return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", text_config=text,
              vision_config=vision, image_token_index=cfg.image_token_id,
              vision_feature_layer=layer if isinstance(layer, int) else list(layer),
              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
              projector_hidden_act=cfg.projector_hidden_act, multimodal_projector_bias=cfg.projector_bias,
              tie_word_embeddings=t.tie_word_embeddings)

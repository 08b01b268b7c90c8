"""The one table from HF LLaMA tensor names to our Flax parameter tree.

Every loader (GGUF, safetensors, PyTorch .bin) produces HF-named float numpy arrays in torch layout
([out, in] for linear weights) and hands them to `params_from_hf` (whole tensors, host numpy) or
`params_from_hf_sharded` (blocks of tensors, straight into each parameter's sharding on a mesh).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from vsd_jax.models.llama import LlamaConfig

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


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where one Flax parameter comes from: HF tensor name(s) and the layout change.

  hf_names: one name, or (stacked) one per layer, stacked on a leading [L] axis.
  transpose: HF linear weights are [out, in], Flax kernels [in, out].
  """
  hf_names: tuple
  transpose: bool
  stacked: bool


def param_sources(cfg: LlamaConfig, has: Callable[[str], bool]) -> dict:
  """The name table as {Flax path (tuple of keys): ParamSource}, for every parameter of LlamaForCausalLM(cfg).

  Layers are stacked on a leading axis [L, ...] when cfg.scan_layers, else stored as layers_{i}.
  HF layout needs no q/k permutation (our RoPE is HF's rotate-half); GGUF loaders undo llama.cpp's before.
  """
  sources = {("embed_tokens", "embedding"): ParamSource(("model.embed_tokens.weight",), False, False),
             ("norm", "scale"): ParamSource(("model.norm.weight",), False, False)}
  if not cfg.tie_word_embeddings:
    if not has("lm_head.weight"):
      raise ValueError("checkpoint has no lm_head.weight but the config says tie_word_embeddings=False")
    sources[("lm_head", "kernel")] = ParamSource(("lm_head.weight",), True, False)
  for hf_name, path, transpose in _LAYER_TABLE:
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


def config_from_hf_dict(d: dict, **overrides) -> LlamaConfig:
  """LlamaConfig from an HF config.json dict (LLaMA/Vicuna/SmolLM2/Llama-3)."""
  if d.get("model_type", "llama") not in ("llama", "mistral"):
    raise ValueError(f"model_type={d.get('model_type')!r} is not a LLaMA-family model")
  rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", rope.get("type"))
  theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
  eos = d.get("eos_token_id", 2)
  heads = d["num_attention_heads"]
  kw = dict(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads", heads),
      head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta), max_position_embeddings=d.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), bos_token_id=d.get("bos_token_id", 1),
      eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
  if rope_type == "llama3":
    kw.update(rope_scaling_type="llama3", rope_scaling_factor=float(rope["factor"]),
              rope_low_freq_factor=float(rope["low_freq_factor"]),
              rope_high_freq_factor=float(rope["high_freq_factor"]),
              rope_original_max_position=int(rope["original_max_position_embeddings"]))
  elif rope_type not in (None, "default"):
    raise ValueError(f"rope scaling {rope_type!r} is not supported (supported: default, llama3)")
  kw.update(overrides)
  return LlamaConfig(**kw)

"""The one table from HF LLaMA tensor names to our Flax parameter tree.

Every loader (GGUF, safetensors, PyTorch .bin) produces HF-named float32 numpy arrays in torch layout
([out, in] for linear weights) and hands them to `params_from_hf`.
"""

from __future__ import annotations

from typing import Callable

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


def params_from_hf(cfg: LlamaConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> dict:
  """Build the Flax params pytree (numpy, cfg.param_dtype) from HF-named tensors.

  Layers are stacked on a leading axis [L, ...] when cfg.scan_layers, else stored as layers_{i}.
  """
  dt = np.dtype(cfg.jnp_param_dtype) if cfg.param_dtype != "bfloat16" else None

  def cast(x):
    import jax.numpy as jnp
    return np.asarray(x, np.float32).astype(dt) if dt is not None else np.asarray(jnp.asarray(x, jnp.bfloat16))

  params: dict = {}
  _set(params, ("embed_tokens", "embedding"), cast(get("model.embed_tokens.weight")))
  _set(params, ("norm", "scale"), cast(get("model.norm.weight")))
  if not cfg.tie_word_embeddings:
    if not has("lm_head.weight"):
      raise ValueError("checkpoint has no lm_head.weight but the config says tie_word_embeddings=False")
    _set(params, ("lm_head", "kernel"), cast(get("lm_head.weight").T))
  for hf_name, path, transpose in _LAYER_TABLE:
    per_layer = []
    for i in range(cfg.num_layers):
      w = get(f"model.layers.{i}.{hf_name}")
      per_layer.append(cast(w.T if transpose else w))
    if cfg.scan_layers:
      _set(params, ("layers",) + path, np.stack(per_layer))
    else:
      for i, w in enumerate(per_layer):
        _set(params, (f"layers_{i}",) + path, w)
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

"""Load a llama.cpp GGUF file (any quantisation the `gguf` package dequantises) as HF-named tensors.

Architectures (general.architecture): "llama" (LLaMA, SmolLM2, Mistral: llama.cpp converts Mistral to the llama
architecture, q/k rows permuted for its interleaved RoPE, and stores no sliding window: pass sliding_window=4096
as a config override for Mistral v0.1), "qwen2" (q/k/v biases) and "qwen3" (q/k norms); Qwen's q/k are stored as
in HF (llama.cpp ropes them in NeoX order), so only "llama" is un-permuted.
"""

from __future__ import annotations

import os

import gguf
import numpy as np

from vsd_jax.models.llama import LlamaConfig
from vsd_jax.weights.convert import params_from_hf

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# general.architecture -> the LlamaConfig fields it fixes (as convert.HF_ARCHITECTURES for config.json)
GGUF_ARCHITECTURES = {"llama": dict(), "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True)}


def gguf_name(hf_name: str) -> str:
  """The GGUF tensor name of an HF one (the table above read backwards): what `open_gguf` maps back to hf_name."""
  for g, hf in _GLOBAL_NAMES.items():
    if hf == hf_name:
      return g
  _, _, layer, *rest = hf_name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
  module, kind = ".".join(rest[:-1]), rest[-1]
  block = {hf: g for g, hf in _BLOCK_NAMES.items()}
  if module not in block:
    raise ValueError(f"no GGUF name for HF tensor {hf_name!r}")
  return f"blk.{layer}.{block[module]}.{kind}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves).

  llama.cpp stores each head's rows as (D/2, 2) interleaved pairs; HF as (2, D/2) halves.
  """
  out_dim = w.shape[0]
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def open_gguf(path: str, **config_overrides):
  """Returns (LlamaConfig, get, has, chat_template or None) of a GGUF file: get(hf_name) dequantises one
  tensor (float32, HF layout, q/k un-permuted); has(hf_name) says whether the file holds it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path!r}. Check the path, or use a registry name "
                            "such as 'smollm2-135m-instruct'.")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:
    raise ValueError(f"{path!r} is not a readable GGUF file ({e}). Re-download or re-convert it.") from e
  arch = _field(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(f"{path!r}: GGUF architecture {arch!r} is not supported; supported: "
                     f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
  a = arch + "."
  heads = int(_field(reader, a + "attention.head_count"))
  kv_heads = int(_field(reader, a + "attention.head_count_kv", heads))
  hidden = int(_field(reader, a + "embedding_length"))
  names = {t.name for t in reader.tensors}
  eos = _field(reader, "tokenizer.ggml.eos_token_id", 2)
  kw = dict(
      vocab_size=int(_field(reader, a + "vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens"))),
      hidden_size=hidden, intermediate_size=int(_field(reader, a + "feed_forward_length")),
      num_layers=int(_field(reader, a + "block_count")), num_heads=heads, num_kv_heads=kv_heads,
      head_dim=int(_field(reader, a + "attention.key_length", 0) or _field(reader, a + "rope.dimension_count", 0)
                   or hidden // heads),
      rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
      max_position_embeddings=int(_field(reader, a + "context_length", 4096)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)), eos_token_ids=(int(eos),),
      **GGUF_ARCHITECTURES[arch])
  kw.update(config_overrides)
  cfg = LlamaConfig(**kw)

  tensors = {}
  for t in reader.tensors:
    if t.name in _GLOBAL_NAMES:
      hf = _GLOBAL_NAMES[t.name]
    else:
      parts = t.name.split(".")  # blk.{i}.{kind}.weight
      if parts[0] != "blk" or parts[2] not in _BLOCK_NAMES:
        continue  # e.g. rope_freqs: derived from the config instead
      hf = f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    tensors[hf] = t

  def get(name):
    if name not in tensors:
      raise ValueError(f"{path!r} has no tensor for {name!r}; the file is incomplete or not a {arch} model.")
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim > 1 else w.reshape(-1)
    if arch != "llama":
      return w
    if name.endswith("q_proj.weight"):
      w = unpermute_qk(w, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      w = unpermute_qk(w, cfg.num_kv_heads)
    return w

  return cfg, get, (lambda n: n in tensors), _field(reader, "tokenizer.chat_template")


def read_gguf(path: str, **config_overrides):
  """Returns (LlamaConfig, params numpy pytree, chat_template or None) from a GGUF file."""
  cfg, get, has, chat_template = open_gguf(path, **config_overrides)
  return cfg, params_from_hf(cfg, get, has), chat_template

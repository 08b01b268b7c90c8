"""Tiny random HF checkpoints of each supported text architecture, written by transformers itself (offline):
the reference models of the Qwen2/Qwen3/Mistral parity, GGUF and draft tests."""

import numpy as np

# arch id -> (transformers config class, model class, config fields beyond the shared ones)
VARIANTS = {
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),  # head_dim != H/Q
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=12, tie_word_embeddings=False)),
    "mistral-nowindow": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
}
VOCAB = 300


def tiny_hf_model(variant: str, directory=None, seed: int = 0, **overrides):
  """A random float32 transformers model of VARIANTS[variant] (3 layers, hidden 64, GQA 4/2), saved as safetensors
  to `directory` when given. initializer_range 0.2 makes next-token distributions peaked (no greedy near-ties)."""
  import torch
  import transformers
  cfg_cls, model_cls, fields = VARIANTS[variant]
  torch.manual_seed(seed)
  kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  kw.update(fields)
  kw.update(overrides)
  cfg = getattr(transformers, cfg_cls)(**kw)
  model = getattr(transformers, model_cls)(cfg).eval()
  if variant.startswith("qwen2"):  # transformers initialises biases to 0: make them matter
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith("bias") or name.endswith("norm.weight"):
          p.add_(0.3 * torch.randn_like(p))
  if variant.startswith("qwen3"):
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
          p.add_(0.3 * torch.randn_like(p))
  if directory is not None:
    model.save_pretrained(str(directory))
  return model


def hf_logits(model, ids) -> np.ndarray:
  """float32 [B, T, V] logits of int ids [B, T]."""
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.numpy()


def write_tiny_gguf(model, path, arch: str) -> str:
  """Write transformers `model`'s float32 weights as a GGUF of llama.cpp architecture `arch` ("llama", "qwen2",
  "qwen3"): names by gguf_file.gguf_name, q/k rows permuted as llama.cpp's converter does for "llama" only."""
  import gguf
  from vsd_jax.weights.gguf_file import gguf_name
  c = model.config
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_dimension_count(head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
  w.add_vocab_size(c.vocab_size)
  w.add_bos_token_id(c.bos_token_id)
  w.add_eos_token_id(c.eos_token_id)
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    a = t.detach().numpy().astype(np.float32)
    heads = {"q_proj.weight": c.num_attention_heads, "k_proj.weight": c.num_key_value_heads}.get(
        ".".join(name.split(".")[-2:]))
    if arch == "llama" and heads:  # llama.cpp's convert script: rows (heads, 2, D/2) -> (heads, D/2, 2)
      a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)

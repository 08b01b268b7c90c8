"""The one table of target architectures: registry name (vsd_jax/weights/registry.py REGISTRY) -> the
LlamaConfig fields of that model's hub config.json (as `weights/convert.config_from_hf_dict` maps them), so
the paper configs (configs/vicuna.py, configs/llama3.py) and dry runs (vsd_jax/dry_run.py) need no download.

Imports nothing heavy: configs and the dry run read it before JAX starts.
"""

from __future__ import annotations

# Fields shared by the LLaMA-1 vocabulary models (Vicuna v1.3: LLaMA-1 fine-tunes, 2048 positions, no GQA).
_VICUNA = dict(vocab_size=32000, head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
               tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
# Fields shared by Llama 3.1 / 3.3 (128K vocabulary, 8 KV heads, "llama3" RoPE scaling to 131072 positions).
_LLAMA3 = dict(vocab_size=128256, head_dim=128, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_position=8192, max_position_embeddings=131072,
               tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))

ARCHS = {
    "smollm2-135m-instruct": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                  num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                                  max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                                  eos_token_ids=(2,)),
    "vicuna-7b-v1.3": dict(_VICUNA, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                           num_kv_heads=32),
    "vicuna-13b-v1.3": dict(_VICUNA, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                            num_kv_heads=40),
    "llama-3.1-8b-instruct": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32),
    "llama-3.3-70b-instruct": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64),
}


def arch(name: str) -> dict:
  """A copy of ARCHS[name] (LlamaConfig fields); a clear error for a name not in the table."""
  key = str(name).lower()
  if key not in ARCHS:
    raise KeyError(f"no architecture known for model {name!r}; use one of {', '.join(sorted(ARCHS))}, or set "
                   "config.model.arch to its LlamaConfig fields (see vsd_jax/models/archs.py).")
  return dict(ARCHS[key])

"""The one table of target architectures: registry name (vsd_jax/weights/registry.py REGISTRY) -> the
LlamaConfig fields of that model's hub config.json (as `weights/convert.config_from_hf_dict` maps them), so
the paper configs (configs/vicuna.py, configs/llama3.py) and dry runs (vsd_jax/dry_run.py) need no download.

Multimodal targets (LLaVA-1.5, models/llava.py): ARCHS holds the language model's LlamaConfig fields and
LLAVA_ARCHS the rest of the llava-hf config.json (the CLIP tower's ClipVisionConfig fields under "vision", and
LlavaConfig's own fields), so `dry_run.target_config` builds the whole LlavaConfig without a download.

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

# LLaVA-1.5's language models: Vicuna v1.5 (LLaMA-2 fine-tunes, 4096 positions) with the llava-hf vocabulary of
# 32064 rows (32000 + <image> 32000 + <pad> 32001, padded to a multiple of 64); llava-hf/llava-1.5-*-hf config.json.
_LLAVA15_TEXT = dict(vocab_size=32064, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
# Its vision side: CLIP ViT-L/14 at 336 px, hidden state -2 without CLS, GELU projector (576 image tokens per image).
_LLAVA15 = dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                            patch_size=14, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
                image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                projector_hidden_act="gelu", projector_bias=True)

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
    "llava-1.5-7b": dict(_LLAVA15_TEXT, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                         num_kv_heads=32),
    "llava-1.5-13b": dict(_LLAVA15_TEXT, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                          num_kv_heads=40),
    # weights/tiny_llava.py (a random checkpoint written on first use)
    "tiny-llava-random": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=8, num_heads=4,
                              num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                              max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                              eos_token_ids=(2,)),
}

# Registry name -> the LLaVA fields besides the language model's (LlavaConfig's own; "vision": ClipVisionConfig's).
LLAVA_ARCHS = {
    "llava-1.5-7b": _LLAVA15,
    "llava-1.5-13b": _LLAVA15,
    "tiny-llava-random": dict(_LLAVA15, vision=dict(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                                                     image_size=42, patch_size=14, num_channels=3, layer_norm_eps=1e-5,
                                                     hidden_act="quick_gelu"), image_token_id=4),
}


def arch(name: str) -> dict:
  """A copy of ARCHS[name] (LlamaConfig fields); a clear error for a name not in the table."""
  key = str(name).lower()
  if key not in ARCHS:
    raise KeyError(f"no architecture known for model {name!r}; use one of {', '.join(sorted(ARCHS))}, or set "
                   "config.model.arch to its LlamaConfig fields (see vsd_jax/models/archs.py).")
  return dict(ARCHS[key])


def llava_arch(name: str):
  """A deep copy of LLAVA_ARCHS[name] (None for a text model)."""
  key = str(name).lower()
  return None if key not in LLAVA_ARCHS else dict(LLAVA_ARCHS[key], vision=dict(LLAVA_ARCHS[key]["vision"]))

"""The one table of target architectures: registry name (vsd_jax/weights/registry.py REGISTRY) -> the
LlamaConfig fields of that model's hub config.json (as `weights/convert.config_from_hf_dict` maps them), so
the paper configs (configs/vicuna.py, configs/llama3.py, configs/qwen3.py) and dry runs (vsd_jax/dry_run.py) need
no download. Each entry's fields were checked against the model's published config.json on the hub.

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
# Fields shared by Qwen3 dense (config.json: model_type "qwen3", head_dim 128 whatever hidden_size / heads is, 8 KV
# heads, no q/k/v bias, use_sliding_window false, 40960 positions; eos <|im_end|> 151645).
_QWEN3 = dict(vocab_size=151936, head_dim=128, num_kv_heads=8, rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=40960, bos_token_id=151643, eos_token_ids=(151645,), qk_norm=True)
# Fields shared by Qwen2.5-Instruct (model_type "qwen2": q/k/v bias, use_sliding_window false, 32768 positions;
# the 0.5B/1.5B tie their embeddings and have 151936 vocabulary rows, 7B and up 152064).
_QWEN25 = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, bos_token_id=151643,
               eos_token_ids=(151645,), qkv_bias=True)

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
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                     tie_word_embeddings=False),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40,
                      tie_word_embeddings=False),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                      tie_word_embeddings=False),
    "qwen2.5-0.5b-instruct": dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                  num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-1.5b-instruct": dict(_QWEN25, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                  num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "qwen2.5-7b-instruct": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
    "qwen2.5-14b-instruct": dict(_QWEN25, vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
                                 num_heads=40, num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen2.5-32b-instruct": dict(_QWEN25, vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                                 num_heads=40, num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
    "qwen2.5-72b-instruct": dict(_QWEN25, vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                                 num_heads=64, num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
    # model_type "mistral" with "sliding_window": null (v0.3 attends to every earlier token).
    "mistral-7b-instruct-v0.3": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                     num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                     rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False,
                                     bos_token_id=1, eos_token_ids=(2,), sliding_window=None),
    # Llama-3.1-8B's architecture; its config.json has the one eos <|end_of_sentence|> 128001.
    "deepseek-r1-distill-llama-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                         num_heads=32, eos_token_ids=(128001,)),
    # Qwen2.5-Math-7B's architecture (model_type "qwen2"): rope_theta 10000 and 131072 positions, unlike
    # Qwen2.5-7B-Instruct; bos <|begin_of_sentence|> 151646, eos <|end_of_sentence|> 151643 (the distill's
    # config.json; theta, positions and token ids as recalled from it, not re-read here: no hub access).
    "deepseek-r1-distill-qwen-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                                        tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=131072,
                                        bos_token_id=151646, eos_token_ids=(151643,)),
    # weights/tiny_qwen3.py (a random Qwen3 written on first use; configs/qwen3.py:tiny): ids 256 <|endoftext|>,
    # 258 <|im_end|>
    "tiny-qwen3-random": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
                              num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=256,
                              eos_token_ids=(258,), qk_norm=True),
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

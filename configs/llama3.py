"""Llama-3 targets: Llama-3.1-8B-Instruct and Llama-3.3-70B-Instruct (gated on the hub).

  python -m vsd_jax.train --config configs/llama3.py                    # 8B on a TPU v5p-32 slice (16 chips)
  python -m vsd_jax.train --config configs/llama3.py:70b                # 70B on a TPU v5p-64 slice (32 chips)
  python -m vsd_jax.train --config configs/llama3.py:70b --dry_run      # compile here, print per-chip memory
  launch/tpu_pod.sh --name vsd --zone us-east5-a --type v5p-64 -- --config configs/llama3.py:70b
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config

_LLAMA3 = dict(vocab_size=128256, head_dim=128, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_position=8192, max_position_embeddings=131072,
               tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))
# size -> (registry name, architecture (the hub's config.json), slice, mesh (data, fsdp, tensor)).
# Tensor parallelism splits the heads of the draft's TTT attention (over 7 x 2048 keys), which dominates the
# activations, and the 128256-entry target logits: the dry run gives 8B ~50 GiB per chip with FSDP 8 x
# tensor 2 against ~81 GiB with FSDP 16 alone; 70B FSDP 8 x tensor 4 (64 heads, 8 KV heads).
MODELS = {
    "8b": ("llama-3.1-8b-instruct",
           dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32),
           "v5p-32", (1, 8, 2)),
    "70b": ("llama-3.3-70b-instruct",
            dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64),
            "v5p-64", (1, 8, 4)),
}


def get_config(size="8b"):
  size = str(size).lower()
  if size not in MODELS:
    raise ValueError(f"configs/llama3.py:{size}: use one of {sorted(MODELS)}")
  name, arch, slice_name, (data, fsdp, tensor) = MODELS[size]
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", f"llama3_{size}")
  c.model.name = name
  c.model.arch = arch
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 4096
  c.generate.batch_size = 1
  # EAGLE-3's training prompts: ShareGPT + UltraChat-200K from the hub (local files: see config_base.py).
  c.data.sources = dict(
      sharegpt=dict(type="hub", name="Aeala/ShareGPT_Vicuna_unfiltered", split="train", format="sharegpt",
                    data_files="ShareGPT_V4.3_unfiltered_cleaned_split.json", limit=-1),
      ultrachat=dict(type="hub", name="HuggingFaceH4/ultrachat_200k", split="train_sft", format="messages",
                     limit=-1))
  c.data.draft_vocab_size = 32000
  c.data.max_length = 2048
  c.data.buckets = (512, 1024, 2048)
  # EAGLE-3's released recipe (eagle/traineagle3/ds_config.json): AdamW b=(0.9, 0.95), no weight decay,
  # clip 0.5, peak lr 5e-5 after 12000 warmup steps, 800000 steps, 7-step TTT; 1 sequence per GPU x 2
  # accumulation x 8 GPUs = 16 sequences per update. (Their decay is linear, ours cosine.)
  c.train.batch_size = 16
  c.train.lr = 5e-5
  c.train.warmup_steps = 12000
  c.train.total_steps = 800000
  c.train.b1, c.train.b2, c.train.weight_decay, c.train.grad_clip = 0.9, 0.95, 0.0, 0.5
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.draft.ttt_steps = 7
  c.mesh.slice = slice_name        # v5p chips: 95 GiB HBM each
  c.mesh.device_memory_gib = 0.0   # 0 = the slice's chip; see vsd_jax/dry_run.py
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c

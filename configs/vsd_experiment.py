"""The VSD vs EAGLE-3 experiment's training config: the shipped GPU base draft's data, continued on a CPU.

  python benchmarks/vsd_experiment.py --base_draft ../shared/drafts/smollm2-eagle3-gpu-1500/draft \
      --data_cache runs/exp_cache --arms eagle3,vsd_exact --seeds 0,1 --steps 40 --out runs/vsd_exp15

The data settings are exactly those the base (`../shared/drafts/smollm2-eagle3-gpu-1500/README.md`) was
trained with, so its response cache (copied to a writable --config.data.cache_dir) covers every prompt and
nothing is regenerated. Every arm continues the base (--config.draft.init_from) with the same optimizer,
batch, data order (seed) and number of steps; the arms differ only in `method` and `vsd.*` (the experiment
script's ARMS table). Results: docs/RESULTS.md section 4.
"""

import importlib.util
import os

from vsd_jax.config_base import REPO_ROOT


def get_config():
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  c = tiny.get_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "vsd_experiment")
  c.data.cache_dir = os.path.join(REPO_ROOT, "runs", "exp_cache")
  # The base draft's data (its README's command): every prompt of alpaca and self_instruct, 1500 of gsm8k,
  # responses regenerated greedily with at most 256 new tokens, sequences of at most 512 tokens.
  c.data.sources.alpaca.limit = -1
  c.data.sources.gsm8k.limit = 1500
  c.data.sources.self_instruct.limit = -1
  c.data.regen.batch_size = 256
  c.data.regen.max_new_tokens = 256
  c.data.max_length = 512
  c.data.buckets = (256, 512)
  c.train.target_features = "in_step"   # VSD's sampled E-step needs the target's KV cache inside the step
  c.train.batch_size = 8
  c.train.total_steps = 40
  c.train.warmup_steps = 4
  c.train.lr = 2e-4                      # the base ended its cosine schedule at 0 from 6e-4
  c.train.checkpoint_every = 100000
  c.train.log_every = 5
  c.train.progress_bar = False
  c.eval.heldout_limit = 24
  c.method = "eagle3"
  # VSD at the decoder's chain depth; S, M sized for the CPU (paper scale: config_base).
  c.vsd.depth = 6
  c.vsd.num_paths = 8
  c.vsd.num_anchors = 8
  c.vsd.burn_in = 1
  return c

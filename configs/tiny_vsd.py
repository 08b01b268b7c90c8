"""VSD on the embedded default target: configs/tiny.py with method="vsd", sized for a 2-core CPU. It reads
configs/tiny.py's data and response cache (runs/tiny/data_cache), so VSD and EAGLE-3 train on the same sequences.

  python -m vsd_jax.train --config configs/tiny_vsd.py
  python -m vsd_jax.train --config configs/tiny_vsd.py --config.draft.init_from=runs/tiny/draft  # EM refinement

The VSD vs EAGLE-3 experiment that runs it: docs/RESULTS.md section 4 (benchmarks/vsd_experiment.py).
"""

import importlib.util
import os

from vsd_jax.config_base import REPO_ROOT


def get_config():
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  c = tiny.get_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", "tiny_vsd")
  c.data.cache_dir = os.path.join(REPO_ROOT, "runs", "tiny", "data_cache")
  c.method = "vsd"
  c.train.target_features = "in_step"  # VSD's oracle needs the target's KV cache inside the step
  c.train.batch_size = 8
  c.train.total_steps = 30
  c.train.warmup_steps = 4
  c.train.checkpoint_every = 10
  c.train.log_every = 2
  # K = 4 tokens per path: the tree depth the tiny draft is evaluated with, within draft.ttt_steps = 7 (resolve
  # requires depth <= ttt_steps for vsd.estep="exact", which reads the first K TTT steps). Paper scale: config_base.
  c.vsd.depth = 4
  c.vsd.num_paths = 4
  c.vsd.num_anchors = 8
  c.vsd.burn_in = 1
  return c

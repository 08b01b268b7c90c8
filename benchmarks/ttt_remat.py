"""EAGLE-3 train-step time with the TTT scan rematerialised or not (draft_unroll.unroll_chain(remat=...)),
interleaved in one process: a fixed batch of 4 x 256 draft-vocabulary tokens, base config, 3 steps each after a
compile step, twice each. Prints {"True": [s, s], "False": [s, s]} seconds per step.

  python benchmarks/ttt_remat.py
"""
import functools, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, numpy as np  # noqa: E401
from vsd_jax.weights import load_target
from vsd_jax.weights.draft_io import load_draft
from vsd_jax.config_base import base_config
from vsd_jax.training.trainer import MethodSteps
from vsd_jax.methods import build_method
import vsd_jax.methods.eagle3.loss as L
import vsd_jax.models.draft_unroll as U
target = load_target("smollm2-135m-instruct")
_, _, d2t, t2d = load_draft(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "drafts", "smollm2-eagle3-gpu-1500", "draft"), target.config)
class V: pass
vocab = V(); vocab.d2t, vocab.t2d = np.asarray(d2t), np.asarray(t2d)
b, t = 4, 256
ids = np.arange(len(d2t)) + np.asarray(d2t)
g = np.random.default_rng(0)
batch = dict(input_ids=ids[g.integers(0, len(ids), (b, t))].astype(np.int32), attention_mask=np.ones((b, t), np.int32),
             loss_mask=(np.arange(t)[None] >= t // 4).repeat(b, 0).astype(np.int32))
res = {}
for remat in (True, False, True, False):
  L.unroll_chain = functools.partial(U.unroll_chain, remat=remat)
  c = base_config(); c.method = "eagle3"; c.train.batch_size = b
  steps = MethodSteps(c, build_method(c, target, vocab))
  jax.block_until_ready(steps(batch))
  t0 = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(steps(batch))
  res.setdefault(str(remat), []).append((time.perf_counter() - t0) / 3)
print(json.dumps(res))

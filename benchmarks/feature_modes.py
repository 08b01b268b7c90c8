"""EAGLE-3 target features in the step vs precomputed: which is faster here (configs/tiny.py data).

  python benchmarks/feature_modes.py --config configs/tiny.py [--sequences 64] [--steps 3]

Times (1) the precompute pass (vsd_jax.training.feature_cache) over the first --sequences sequences, per
sequence; (2) the jitted EAGLE-3 train step in both modes on the same batches, interleaved, after a compile
step each. Then: a step saves (in_step - precomputed) seconds for batch_size sequences, so precomputing pays
off once each sequence is seen more than pass_per_sequence / (saving / batch_size) times (epochs).
Prints one JSON line.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from vsd_jax.cli_config import define_config_flag, run_app  # noqa: E402
# JAX and the training modules are imported in main, as vsd_jax/train.py does: a bad flag or config field fails before
# they load.

_CONFIG = define_config_flag()
flags.DEFINE_integer("sequences", 64, "Sequences in the timed precompute pass.")
flags.DEFINE_integer("steps", 3, "Timed steps per mode.")


def main(_):
  import jax

  from vsd_jax import parallel
  from vsd_jax.data.dataset import SequenceDataset, iterate_batches
  from vsd_jax.data.pipeline import prepare_data
  from vsd_jax.training.feature_cache import build_feature_cache, with_cached_targets
  from vsd_jax.methods import build_method
  from vsd_jax.training.trainer import MethodSteps
  from vsd_jax.weights import load_target

  config, flag_values = _CONFIG.value, flags.FLAGS
  target = load_target(config.model.name, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  data = prepare_data(config, target)
  bs, buckets = int(config.train.batch_size), tuple(config.data.buckets)
  full = data.dataset
  sub = SequenceDataset(full.input_ids[:flag_values.sequences], full.loss_mask[:flag_values.sequences])
  vocab = data.draft_vocab
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    cache = build_feature_cache(target, sub, vocab.d2t, vocab.t2d, os.path.join(tmp, "f"), bs, buckets)
    pass_s = time.perf_counter() - t0
    plain = list(iterate_batches(sub, bs, seed=0, buckets=(max(buckets),)))[:flag_values.steps + 1]
    cached = list(with_cached_targets(iterate_batches(sub, bs, seed=0, buckets=(max(buckets),), with_index=True),
                                      cache, vocab.t2d))[:flag_values.steps + 1]
    method = build_method(config, target, vocab)
    mesh, rules = parallel.make_mesh(config), parallel.logical_axis_rules(config)
    runs = {}
    for name, batches in (("in_step", plain), ("precomputed", cached)):
      steps = MethodSteps(config, method, mesh, rules)
      jax.block_until_ready(steps(batches[0]))  # compiles
      runs[name] = dict(steps=steps, batches=batches, times=[])
    for i in range(1, flag_values.steps + 1):
      for name, r in runs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(r["steps"](r["batches"][i]))
        r["times"].append(time.perf_counter() - t0)
  step_s = {name: sum(r["times"]) / len(r["times"]) for name, r in runs.items()}
  per_seq_pass = pass_s / len(sub)
  saving_per_seq = (step_s["in_step"] - step_s["precomputed"]) / bs
  print(json.dumps(dict(sequences=len(sub), batch=[bs, max(buckets)], pass_s=pass_s, pass_s_per_sequence=per_seq_pass,
                        step_s=step_s, breakeven_epochs=per_seq_pass / saving_per_seq if saving_per_seq > 0 else None)))


if __name__ == "__main__":
  run_app(main)

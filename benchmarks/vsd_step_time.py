"""Train-step time of VSD vs EAGLE-3 on the same batches, same process (configs/tiny.py data and target).

  python benchmarks/vsd_step_time.py --config configs/tiny_vsd.py [--steps 3] [--config.vsd.num_paths=4 ...]
  python benchmarks/vsd_step_time.py --config configs/vsd_experiment.py --grid 8x8,4x4,2x2   # M x S settings

--grid times several VSD settings (anchors M x proposals S per anchor) against one EAGLE-3 in the same run, so
the cost frontier of the sampled estimator comes from one process on the same batches.

Builds both methods with vsd_jax.methods.build_method, jits one sharded train step each
(trainer.make_train_step on the configured mesh), compiles on the first batch, then times --steps
steps of each on the same batches, interleaved. Prints a JSON line with seconds per step and the ratio.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from vsd_jax.cli_config import define_config_flag, run_app  # noqa: E402
# JAX and the training modules are imported in main, as vsd_jax/train.py does: a bad flag or config field fails before
# they load.

_CONFIG = define_config_flag()
flags.DEFINE_integer("steps", 3, "Timed steps per method (after one compile step).")
flags.DEFINE_string("grid", "", "Comma-separated MxS VSD settings (vsd.num_anchors x vsd.num_paths) timed in the "
                    "same run, e.g. 8x8,4x4; default: the config's one setting.")


def grid_settings(grid: str) -> list:
  """'8x8,4x2' -> [(8, 8), (4, 2)] (num_anchors, num_paths); a bad entry names itself and the form."""
  out = []
  for item in filter(None, grid.split(",")):
    parts = item.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f"--grid entry {item!r}: use MxS with positive integers (anchors x proposals), e.g. 8x8")
    out.append((int(parts[0]), int(parts[1])))
  return out


def main(_):
  import copy

  import jax

  from vsd_jax import parallel
  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.data.pipeline import prepare_data
  from vsd_jax.methods import build_method
  from vsd_jax.training.trainer import MethodSteps
  from vsd_jax.weights import load_target

  config = _CONFIG.value
  target = load_target(config.model.name, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  data = prepare_data(config, target)
  batches = list(iterate_batches(data.dataset, int(config.train.batch_size), seed=0,
                                 buckets=(max(config.data.buckets),)))[:flags.FLAGS.steps + 1]
  mesh = parallel.make_mesh(config)
  rules = parallel.logical_axis_rules(config)
  settings = grid_settings(flags.FLAGS.grid) or [(int(config.vsd.num_anchors), int(config.vsd.num_paths))]
  variants = {"eagle3": None}
  variants.update({f"vsd_{m}x{s}" if flags.FLAGS.grid else "vsd": (m, s) for m, s in settings})
  runs = {}
  for name, ms in variants.items():
    c = copy.deepcopy(config)
    c.method = "eagle3" if ms is None else "vsd"
    if ms is not None:
      c.vsd.num_anchors, c.vsd.num_paths = ms
    steps = MethodSteps(c, build_method(c, target, data.draft_vocab), mesh, rules)
    t0 = time.perf_counter()
    jax.block_until_ready(steps(batches[0]))
    runs[name] = dict(steps=steps, times=[], compile_s=time.perf_counter() - t0)
  for b in batches[1:]:
    for name, r in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(r["steps"](b))
      r["times"].append(time.perf_counter() - t0)
  out = {name: dict(step_s=sum(r["times"]) / len(r["times"]), first_step_s=r["compile_s"]) for name, r in runs.items()}
  for name, ms in variants.items():
    if ms is not None:
      out[name].update(depth=int(config.vsd.depth), num_anchors=ms[0], num_paths=ms[1])
      out["vsd_over_eagle3" + name[len("vsd"):]] = out[name]["step_s"] / out["eagle3"]["step_s"]
  out["batch"] = [int(config.train.batch_size), int(max(config.data.buckets))]
  print(json.dumps(out))


if __name__ == "__main__":
  run_app(main)

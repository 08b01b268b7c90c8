"""Train-step time of VSD vs EAGLE-3 on the same batches, same process (configs/tiny.py data and target).

  python benchmarks/vsd_step_time.py --config configs/tiny_vsd.py [--steps 3] [--config.vsd.num_paths=4 ...]

Builds both methods with vsd_jax.training.methods.build_method, jits one sharded train step each
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

_CONFIG = define_config_flag()
flags.DEFINE_integer("steps", 3, "Timed steps per method (after one compile step).")


def main(_):
  import copy

  import jax

  from vsd_jax import parallel
  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.data.pipeline import prepare_data
  from vsd_jax.training.methods import build_method
  from vsd_jax.training.state import create_train_state, make_optimizer, state_shardings
  from vsd_jax.training.trainer import make_train_step
  from vsd_jax.weights import load_target

  config = _CONFIG.value
  target = load_target(config.model.name, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  data = prepare_data(config, target)
  batches = list(iterate_batches(data.dataset, int(config.train.batch_size), seed=0,
                                 buckets=(max(config.data.buckets),)))[:flags.FLAGS.steps + 1]
  mesh = parallel.make_mesh(config)
  rules = parallel.logical_axis_rules(config)
  runs = {}
  for name in ("eagle3", "vsd"):
    c = copy.deepcopy(config)
    c.method = name
    method = build_method(c, target, data.draft_vocab)
    tx, schedule = make_optimizer(c.train)
    _, shardings = state_shardings(method.init_params, tx, jax.random.PRNGKey(0), mesh, rules, method.method_state)
    state = create_train_state(method.init_params, tx, jax.random.PRNGKey(0), shardings, method.method_state)
    frozen_sh = parallel.shardings_of(method.frozen, mesh)
    batch_sh = parallel.batch_shardings(batches[0], mesh, rules)
    step = make_train_step(method.loss_fn, tx, mesh=mesh, rules=rules, shardings=shardings,
                           frozen_shardings=frozen_sh, batch_shardings=batch_sh, lr_schedule=schedule,
                           stateful=method.method_state is not None)
    frozen = parallel.place(method.frozen, frozen_sh)
    t0 = time.perf_counter()
    state, m = step(state, frozen, parallel.shard_batch(batches[0], batch_sh))
    jax.block_until_ready(m)
    runs[name] = dict(step=step, state=state, frozen=frozen, batch_sh=batch_sh, times=[],
                      compile_s=time.perf_counter() - t0)
  for b in batches[1:]:
    for name, r in runs.items():
      t0 = time.perf_counter()
      r["state"], m = r["step"](r["state"], r["frozen"], parallel.shard_batch(b, r["batch_sh"]))
      jax.block_until_ready(m)
      r["times"].append(time.perf_counter() - t0)
  out = {name: dict(step_s=sum(r["times"]) / len(r["times"]), first_step_s=r["compile_s"]) for name, r in runs.items()}
  out["vsd_over_eagle3"] = out["vsd"]["step_s"] / out["eagle3"]["step_s"]
  out["batch"] = [int(config.train.batch_size), int(max(config.data.buckets))]
  out["vsd"].update({k: config.vsd[k] for k in ("depth", "num_paths", "num_anchors")})
  print(json.dumps(out))


if __name__ == "__main__":
  run_app(main)

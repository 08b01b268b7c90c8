"""Which EAGLE-3 training recipe learns fastest on a small budget (configs/tiny.py data, 2-core CPU).

  python benchmarks/draft_recipe.py --config configs/tiny.py --train_sequences 96 --heldout 24 --visits 192 \
      --variants b8_lr1e-3,b2_lr1e-3,b2_lr3e-3,b2_lr3e-3_head [--config.draft.ttt_steps=3]

Every variant trains a fresh draft on the same precomputed target features (one pass, cached under
<workdir>/recipe/) for the same number of sequence visits, then reports held-out step-0..k top-1 agreement
on the first --heldout mt_bench prompts (never trained on). A variant name is `b<batch>_lr<lr>` with an
optional `_head` (lm_head and final norm initialised from the target, draft.init_head="target").
Prints a Markdown table and one JSON line.
"""

import copy
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
flags.DEFINE_integer("train_sequences", 96, "Training sequences (the first ones of the dataset).")
flags.DEFINE_integer("heldout", 24, "Held-out mt_bench prompts scored.")
flags.DEFINE_integer("visits", 192, "Sequence visits per variant (steps = visits // batch).")
flags.DEFINE_string("variants", "b8_lr1e-3,b2_lr1e-3,b2_lr3e-3,b2_lr3e-3_head", "Comma-separated variants.")


def parse_variant(name: str) -> dict:
  parts = name.split("_")
  if len(parts) < 2 or not parts[0].startswith("b") or not parts[1].startswith("lr"):
    raise ValueError(f"variant {name!r}: expected b<batch>_lr<lr>[_head]")
  return dict(batch=int(parts[0][1:]), lr=float(parts[1][2:]), head="head" in parts[2:])


def main(_):
  import jax
  import numpy as np

  from vsd_jax import parallel
  from vsd_jax.data.dataset import SequenceDataset, iterate_batches
  from vsd_jax.data.pipeline import prepare_data
  from vsd_jax.weights.identity import model_id
  from vsd_jax.training.heldout import heldout_config
  from vsd_jax.training.feature_cache import build_feature_cache, cache_key, with_cached_targets
  from vsd_jax.methods import build_method
  from vsd_jax.training.trainer import MethodSteps
  from vsd_jax.weights import load_target

  config, flag_values = _CONFIG.value, flags.FLAGS
  target = load_target(config.model.name, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  data = prepare_data(config, target, progress=False)
  vocab, buckets = data.draft_vocab, tuple(config.data.buckets)
  full = data.dataset
  train = SequenceDataset(full.input_ids[:flag_values.train_sequences], full.loss_mask[:flag_values.train_sequences])
  ev = heldout_config(config)
  with ev.unlocked():
    ev.eval.heldout_limit = flag_values.heldout
    ev.data.sources.heldout.limit = flag_values.heldout
  heldout = prepare_data(ev, target, progress=False, draft_vocab=False).dataset
  root = os.path.join(config.workdir, "recipe")
  caches = {}
  t0 = time.perf_counter()
  for name, ds in (("train", train), ("heldout", heldout)):
    key = cache_key(ds, model_id(target), vocab.d2t)
    caches[name] = build_feature_cache(target, ds, vocab.d2t, vocab.t2d, os.path.join(root, f"features-{key}"), 8,
                                       buckets)
  pass_s = time.perf_counter() - t0

  mesh, rules = parallel.make_mesh(config), parallel.logical_axis_rules(config)
  results = []
  for name in flag_values.variants.split(","):
    v = parse_variant(name)
    cfg = copy.deepcopy(config)
    steps = max(flag_values.visits // v["batch"], 2)
    with cfg.unlocked():
      cfg.train.batch_size, cfg.train.lr, cfg.train.total_steps = v["batch"], v["lr"], steps
      cfg.train.warmup_steps = max(1, steps // 10)
      cfg.draft.init_head = "target" if v["head"] else "random"
    method = build_method(cfg, target, vocab)
    steps_fn = MethodSteps(cfg, method, mesh, rules, seed=cfg.seed)
    t0, done, epoch = time.perf_counter(), 0, 0
    while done < steps:
      for b in with_cached_targets(iterate_batches(train, v["batch"], seed=0, epoch=epoch, buckets=buckets,
                                                   with_index=True), caches["train"], vocab.t2d):
        last = steps_fn(b)
        done += 1
        if done >= steps:
          break
      epoch += 1
    state = steps_fn.state
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t0
    eval_fn = jax.jit(method.loss_fn)
    sums, weight = {}, 0.0
    for b in with_cached_targets(iterate_batches(heldout, 8, seed=0, buckets=buckets, drop_last=False,
                                                 with_index=True), caches["heldout"], vocab.t2d):
      _, m = eval_fn(state.params, steps_fn.frozen, b, jax.random.PRNGKey(0))
      w = float(m["num_tokens"])
      for k, x in m.items():
        sums[k] = sums.get(k, 0.0) + float(x) * w
      weight += w
    acc = [sums[f"acc_{k}"] / weight for k in range(int(cfg.draft.ttt_steps))]
    results.append(dict(variant=name, steps=steps, train_s=train_s, heldout_acc=acc,
                        tau_simulated=float(1 + np.sum(np.cumprod(acc))), last_train_acc0=float(last["acc_0"])))
    print(json.dumps(results[-1]), flush=True)
  print(f"\nfeature pass {pass_s:.0f} s; {len(train)} train sequences, {len(heldout)} held-out; "
        f"ttt_steps={config.draft.ttt_steps}, {flag_values.visits} visits per variant\n")
  print("| variant | steps | train s | held-out acc@0..k | tau_sim |\n|---|---|---|---|---|")
  for r in results:
    print(f"| {r['variant']} | {r['steps']} | {r['train_s']:.0f} | {' '.join(f'{a:.3f}' for a in r['heldout_acc'])} "
          f"| {r['tau_simulated']:.3f} |")
  print("RECIPE_JSON " + json.dumps(dict(pass_s=pass_s, results=results)))


if __name__ == "__main__":
  run_app(main)

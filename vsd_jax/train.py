"""Train a draft: regenerate responses with the target, build the draft vocabulary, train, report.

  python -m vsd_jax.train --config configs/tiny.py [--config.train.total_steps=200]

Stages (each timed into <workdir>/stages.json): load target, data (prompts -> target responses, cached),
train (EAGLE-3 TTT loss; one sharded jitted step; orbax checkpoints, resume, SIGTERM), export
(<workdir>/draft, loadable by `generate`/`evaluate --draft`), held-out report (per-step top-1 agreement
and simulated tau on prompts never trained on, default EAGLE's mt_bench).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, NamedTuple, Optional

from absl import flags

from vsd_jax.cli_config import define_config_flag, run_app
from vsd_jax.errors import InputNotFoundError, UserError
from vsd_jax.resolved import resolve
# JAX and everything that imports it are imported inside the functions: --dry_run sets the host device count
# (XLA_FLAGS) before JAX starts, and a bad flag or config field fails before anything heavy loads.

_CONFIG = define_config_flag()
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step for the configured mesh on abstract arrays "
                             "(no weights, no data), print per-device memory and FLOPs, and exit (vsd_jax/dry_run.py).")
_DRY_RUN_SEQ_LEN = flags.DEFINE_integer("dry_run_seq_len", 0, "Batch length T for --dry_run (0 = last data bucket).")
_DRY_RUN_MEMORY = flags.DEFINE_float("dry_run_device_memory_gib", 0.0, "Per-device memory --dry_run checks against "
                                     "(0 = config.mesh.device_memory_gib, else the chip of config.mesh.slice).")


def run_dry_run(config) -> None:
  # Before JAX starts: the mesh's devices are host CPU devices standing in for the chips.
  from vsd_jax import dry_run
  dry_run.ensure_host_devices(dry_run.mesh_size(config))  # a DryRunError is reported by run_app
  report = dry_run.dry_run(config, seq_len=_DRY_RUN_SEQ_LEN.value, device_memory=_DRY_RUN_MEMORY.value)
  print(dry_run.format_report(report))
  print("DRY_RUN_JSON " + json.dumps(report, default=float))


class Loaded(NamedTuple):
  """What several runs of one target and one data setting share (`load_for_training`): the mesh, the target in its
  training layout, the prepared data, and the seconds each took."""
  mesh: Any
  rules: Any
  target: Any
  data: Any
  stages: dict


def check_inputs(config) -> None:
  """Everything a run reads, checked before anything loads: every field's type and range and the rules between them
  (`resolve`), the target's name or files, the prompt sources (training and held-out), draft.init_from and the
  workdir. Raises a UserError naming the field and the fix (run_app prints it)."""
  from vsd_jax.data.sources import check_sources
  from vsd_jax.training.heldout import heldout_config
  from vsd_jax.weights.registry import model_entry

  settings = resolve(config)
  model_entry(settings.model.name)
  check_sources(config.data)
  check_sources(heldout_config(config).data)
  init_from = settings.draft.init_from
  if init_from and not os.path.isfile(os.path.join(init_from, "draft_config.json")):
    raise InputNotFoundError(f"draft.init_from={init_from!r} holds no trained draft (no draft_config.json); pass a "
                             "<workdir>/draft written by vsd_jax.train (or convert_draft), or "
                             "--config.draft.init_from= to start from a random draft")
  try:
    os.makedirs(settings.workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"workdir {settings.workdir!r} cannot be created ({e.strerror}); pass a writable "
                    "--config.workdir") from e


def load_for_training(config) -> Loaded:
  """The mesh, the target and the data of `config` (what runs differing only in method, draft, seed or training
  settings share). The target is read straight into its training layout (sharded by its logical axes, as --dry_run
  compiles it, not replicated per device): each device's block from the files, so a target larger than a chip loads."""
  from vsd_jax import parallel
  from vsd_jax.data.pipeline import prepare_data
  from vsd_jax.weights import load_target

  stages, t0 = {}, time.time()
  mesh = parallel.make_mesh(config)
  rules = parallel.logical_axis_rules(config)
  model = resolve(config).model
  target = load_target(model.name, dtype=model.dtype, param_dtype=model.param_dtype, mesh=mesh, rules=rules)
  stages["load_target_s"] = time.time() - t0
  t = time.time()
  data = prepare_data(config, target)
  stages["data_s"] = time.time() - t
  logging.info("data: %s", json.dumps(data.stats))
  return Loaded(mesh, rules, target, data, stages)


def train(config, loaded: Optional[Loaded] = None) -> dict:
  """One training run of `config`: train, export <workdir>/draft, held-out report; returns the report (also
  written to <workdir>/report.json by process 0). `loaded`: the mesh, target and data of an earlier
  `load_for_training` with the same model, mesh and data settings (runs in one process share them); loaded here
  when None (then its seconds are in this report's stages; a shared one's are not). The caller has checked the
  config with `check_inputs` (main does before the distributed start; the experiment's worker before each run)."""
  import jax

  from vsd_jax import parallel
  from vsd_jax.data.dataset import full_batches, iterate_batches
  from vsd_jax.data.pipeline import data_cache_dir
  from vsd_jax.weights.identity import model_id
  from vsd_jax.methods import build_method
  from vsd_jax.training.feature_cache import build_feature_cache, cache_key, with_cached_targets
  from vsd_jax.training.heldout import heldout_report
  from vsd_jax.training.trainer import train_loop
  from vsd_jax.weights.draft_io import save_draft

  t0 = time.time()
  if loaded is None:
    loaded = load_for_training(config)
    stages = dict(loaded.stages)
  else:
    stages = {}
  mesh, rules, target, data = loaded.mesh, loaded.rules, loaded.target, loaded.data
  run = resolve(config)
  mode = run.train.target_features

  method = build_method(config, target, data.draft_vocab)
  draft, init_params, loss_fn, frozen = method.draft, method.init_params, method.loss_fn, method.frozen
  buckets, bs = run.data.buckets, run.train.batch_size
  per_epoch = full_batches(len(data.dataset), bs, "train.batch_size")  # the data stage is cached: a rerun is quick

  cache = None
  if mode == "precomputed":
    t = time.time()
    key = cache_key(data.dataset, model_id(target), data.draft_vocab.d2t)
    cache = build_feature_cache(target, data.dataset, data.draft_vocab.d2t, data.draft_vocab.t2d,
                                os.path.join(data_cache_dir(run), f"features-{key}"), bs, buckets,
                                pixels=data.pixels, config=config)
    stages["features_s"] = time.time() - t

  def make_batches(start_step):
    epoch, skip = divmod(start_step, per_epoch)
    while True:  # from batch `skip` of the epoch (earlier ones are not read); this process's rows of each
      batches = iterate_batches(data.dataset, bs, seed=run.seed, epoch=epoch, buckets=buckets,
                                sort_window=bs * 8, with_index=cache is not None, pixels=data.pixels, start=skip,
                                process_index=jax.process_index(), process_count=jax.process_count())
      if cache is not None:
        batches = with_cached_targets(batches, cache, data.draft_vocab.t2d)
      yield from batches
      epoch, skip = epoch + 1, 0

  t = time.time()
  frozen_sh = parallel.target_frozen_shardings(frozen, target.model, mesh, rules)  # the layout it was loaded in
  result = train_loop(config, loss_fn, init_params, frozen, make_batches, mesh=mesh, frozen_shardings=frozen_sh,
                      method_state=method.method_state)
  stages["train_s"] = time.time() - t
  if jax.process_count() == 1:
    params = jax.device_get(result.state.params)
  else:  # parameters sharded across hosts: gather whole arrays on every host; process 0 writes
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(result.state.params, tiled=True)
  draft_dir = os.path.join(run.workdir, "draft")
  if jax.process_index() == 0:
    save_draft(draft_dir, draft.cfg, params, data.draft_vocab.d2t, data.draft_vocab.t2d, target.config)
  report = dict(stopped=result.stopped, steps=int(result.step), draft=draft_dir, data=data.stats)
  if result.stopped == "done":  # on every process: the target is sharded across them, its forwards are collective
    t = time.time()
    report["heldout"] = heldout_report(config, target, data.draft_vocab, params)
    stages["heldout_s"] = time.time() - t
  if jax.process_index() != 0:
    return report
  stages["total_s"] = time.time() - t0
  report["stages"] = stages
  # Non-padding sequence tokens through target + draft per second (this run's steps; approximate on resume).
  mean_len = float(data.dataset.lengths.mean())
  report["train_tokens_per_s"] = int(result.step) * bs * mean_len / max(stages["train_s"], 1e-9)
  with open(os.path.join(run.workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1, default=float)
  return report


def main(_):
  if _DRY_RUN.value:
    return run_dry_run(_CONFIG.value)
  import jax

  from vsd_jax import parallel

  config = _CONFIG.value
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  check_inputs(config)
  parallel.maybe_initialize_distributed(config)
  if jax.process_index() != 0:  # one log for the job: the other hosts report only warnings and errors
    logging.getLogger().setLevel(logging.WARNING)
  report = train(config)
  if jax.process_index() == 0:
    print(json.dumps({k: report[k] for k in ("steps", "stopped", "heldout", "stages") if k in report}, indent=1,
                     default=float))


if __name__ == "__main__":
  run_app(main)

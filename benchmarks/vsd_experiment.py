"""VSD vs EAGLE-3 from a real base draft, on the embedded default target: one command, every figure.

  python benchmarks/vsd_experiment.py --base_draft ../shared/drafts/smollm2-eagle3-gpu-1500/draft \
      --data_cache runs/exp_cache --arms eagle3,vsd_exact,vsd --seeds 0,1 --steps 40 --out runs/vsd_exp15

(--data_cache: a writable copy of the base's data_cache; it is copied there when missing and --base_cache
names the original.)

Design. Every arm continues the same base draft (--base_draft, `config.draft.init_from`) on the same data
(configs/vsd_experiment.py: the base's own data settings and response cache) for the same number of
optimizer steps, with the same lr schedule, batch and data order for a seed; arms differ only in the loss:

  eagle3          EAGLE-3's TTT loss only (the baseline)
  vsd             sampled VSD: MCMC E-step over S paths + oracle, ARW + CAR + mu * EAGLE-3 (VSD_METHOD.md)
  vsd_no_arw      plain EM likelihood of the E-step sample instead of ARW
  vsd_no_car      lambda_car = 0
  vsd_snis        the SNIS E-step instead of MCMC
  vsd_exact       exact J = log E_q[U] on the teacher-forced chain (T=0), + mu * EAGLE-3 (methods/vsd/exact.py)
  vsd_reach       EAGLE-3's per-step CE reweighted by the exact reach probabilities (methods/vsd/exact.py)
  eagle3_eqtime   EAGLE-3 given the wall time of the `vsd` arm of the same seed (more steps): equal compute
  vsd_exact_t1    exact J with alpha_k = sum_v min(p_k, q_k) at the data's states, draft and
                  acceptance at T=1 (for T=1 chain decoding); the data stays the target's greedy output
  vsd_t07, vsd_s32, vsd_arw_all   draft temperature 0.7; S = 32 proposals; ARW divided by every anchor
  vsd_share, vsd_share_car2, vsd_share_eta0, vsd_exact_share   the EAGLE-3 term held at 0.7 of the
                  gradient norm (config.vsd.eagle3_grad_share) while lambda_car / eta change, and for exact J
  lk              the stronger baseline: EAGLE-3's TTT with the LK loss on the acceptance rate (arXiv 2602.23881;
                  draft.objective="lk_lambda", the hybrid KL/acceptance form); lk_alpha: its -log(acceptance) form.
                  VSD arms are also compared with lk, paired (summary "paired_vs_lk"), when it is run.

--from_scratch: every arm starts from the same randomly initialised draft (the seed's init: same init, same
data and batch order per seed) instead of --base_draft, which then only names the data cache to copy; no `base` run.

Safe inside a time-limited call: --stop_after_s stops starting new work after that many seconds (a training
run still going then gets SIGTERM, saves a checkpoint and stops), writes the summary of what exists and exits;
the same command again resumes (finished runs and decoded entries are kept, a stopped run continues from its
checkpoint: --checkpoint_every). --mirror DIR receives the summary, decoding.json and every run's report and
metrics each time one finishes, so a call killed at its limit still returns what was done. Every call first
prints the plan (runs, optimizer steps, compiles, decoded entries left) and its estimated GPU time (GPU_RATES).

Seeds: every arm runs at the first seed; the arms in --paired_arms (default eagle3 and every vsd_* arm named)
at every seed. One worker process (--train_worker) trains every run left: the target and the data load once
for all of them (`vsd_jax.train.load_for_training` + `train`), each run's config is configs/vsd_experiment.py with
its overrides (`cli_config.apply_overrides`; OUT/<run>/report.json's "command" trains it alone with
`python -m vsd_jax.train`). Training writes OUT/<arm>_s<seed>/{draft, report.json, metrics.jsonl}; the held-out report
(mt_bench, never trained on) gives teacher-forced acc@k, tau_sim and the draft's own greedy chain tau.

Evaluation loads the target once; per eval set, temperature and decoding mode (the evaluate CLI's default
tree, and chain) it runs vanilla decoding once and speculative decoding with every draft on the same prompts
(batch --eval_batch, default 1), so each speedup is against vanilla in the same process. Per-prompt accepted lengths give a paired
comparison of each arm with `eagle3` over the same prompts: the ratio of mean tau with a bootstrap 95%
interval (prompts resampled, seeds averaged per prompt). Writes OUT/summary.json and OUT/summary.md.
"""

import argparse
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vsd_jax.cli_config import apply_overrides, load_config_file  # noqa: E402
from vsd_jax.data.chat import prompt_encoder  # noqa: E402
from vsd_jax.data.pipeline import data_cache_dir, gen_settings  # noqa: E402
from vsd_jax.weights.identity import model_id  # noqa: E402
from vsd_jax.data.prompt_file import read_prompt_file  # noqa: E402
from vsd_jax.data.regenerate import cache_path  # noqa: E402
from vsd_jax.engine import Engine, Sampling  # noqa: E402
from vsd_jax.decoding.tree import SHAPE_DEFAULTS, TreeConfig  # noqa: E402
from vsd_jax.eval.metrics import summarize  # noqa: E402
from vsd_jax.eval.stats import bootstrap_ratio  # noqa: E402
from vsd_jax.models.draft_vocab import DraftVocab  # noqa: E402
from vsd_jax.resolved import resolve  # noqa: E402
from vsd_jax.train import check_inputs, load_for_training, train  # noqa: E402
from vsd_jax.training.heldout import heldout_report  # noqa: E402
from vsd_jax.weights import load_target  # noqa: E402
from vsd_jax.weights.draft_io import load_draft  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "vsd_experiment.py")
ARMS = {
    "eagle3": ["--config.method=eagle3"],
    "vsd": ["--config.method=vsd"],
    "vsd_no_arw": ["--config.method=vsd", "--config.vsd.arw=False"],
    "vsd_no_car": ["--config.method=vsd", "--config.vsd.lambda_car=0.0"],
    "vsd_snis": ["--config.method=vsd", "--config.vsd.estep=snis"],
    "vsd_exact": ["--config.method=vsd", "--config.vsd.estep=exact", "--config.vsd.exact_form=log_u"],
    "vsd_reach": ["--config.method=vsd", "--config.vsd.estep=exact", "--config.vsd.exact_form=reach"],
    "eagle3_eqtime": ["--config.method=eagle3"],
    # Exact J with the per-step acceptance alpha_k = sum_v min(p, q) at the data's states, the
    # draft and acceptance at temperature 1 (decoding T=1, chain mode); on the greedy data (visited states only).
    "vsd_exact_t1": ["--config.method=vsd", "--config.vsd.estep=exact", "--config.vsd.exact_form=log_u",
                     "--config.vsd.accept_mode=stochastic", "--config.vsd.accept_temperature=1.0"],
    # The proposals' support and scale.
    "vsd_t07": ["--config.method=vsd", "--config.vsd.draft_temperature=0.7"],
    "vsd_s32": ["--config.method=vsd", "--config.vsd.num_paths=32"],
    "vsd_arw_all": ["--config.method=vsd", "--config.vsd.arw_norm=all"],
    # ... and the extra terms' weights swept with the EAGLE-3 term's share of the gradient norm held at 0.7.
    "vsd_share": ["--config.method=vsd", "--config.vsd.eagle3_grad_share=0.7"],
    "vsd_share_car2": ["--config.method=vsd", "--config.vsd.eagle3_grad_share=0.7", "--config.vsd.lambda_car=2.0"],
    "vsd_share_eta0": ["--config.method=vsd", "--config.vsd.eagle3_grad_share=0.7", "--config.vsd.eta=0.0"],
    "vsd_exact_share": ["--config.method=vsd", "--config.vsd.estep=exact", "--config.vsd.exact_form=log_u",
                        "--config.vsd.eagle3_grad_share=0.7"],
    # The stronger per-step baseline: LK losses on the acceptance rate sum_v min(p, q) (methods/eagle3/loss.py).
    "lk": ["--config.method=eagle3", "--config.draft.objective=lk_lambda"],
    "lk_alpha": ["--config.method=eagle3", "--config.draft.objective=lk_alpha"],
}
BASELINE = "eagle3"
BASELINES = ("eagle3", "lk")   # summary["paired_vs_<b>"]: every other arm against b on the same prompts and seeds

# Rates of one H200 for the plan's time estimate. Training, from the shipped base's own GPU run
# (../shared/drafts/smollm2-eagle3-gpu-1500/{report.json, metrics.jsonl}): target load 34.7 s; the first 20 steps
# (with the step's compilation) 57.0 s, then 21.5 steps/s of 16 sequences; held-out report 22.4 s for 80 prompts.
# Sampled VSD's step is 1.24x EAGLE-3's at M 8 x S 8 (benchmarks/vsd_step_time.py --grid, measured on the CPU;
# the GPU ratio is not measured). NOT measured on a GPU, assumed: reading the cached responses 20 s, a decode step
# of the 135M target with the draft's share 4 ms, compiling a decoding loop 15 s. The first GPU run's reports
# (wall_s, stages) replace them.
GPU_RATES = dict(load_s=34.7, data_s=20.0, train_compile_s=57.0 - 20 / 21.5, step_s_per_seq=1 / (21.5 * 16),
                 heldout_s_per_prompt=22.4 / 80, decode_s_per_token=0.004, compile_s=15.0)
SAMPLED_STEP_COST = 1.24   # a sampled-VSD arm's training step in EAGLE-3 steps (exact VSD, LK: 1.0)


def step_cost(arm: str) -> float:
  """An arm's training step in EAGLE-3 steps, for the plan: sampled VSD (an E-step over paths) or not."""
  settings = resolve(apply_overrides(load_config_file(CONFIG), ARMS[arm], CONFIG))
  sampled = settings.method == "vsd" and settings.vsd.estep != "exact"
  return SAMPLED_STEP_COST if sampled else 1.0


class OutOfTime(Exception):
  """--stop_after_s has passed: stop starting new work (what is finished is saved; run again to resume)."""


class Clock:
  """The call's time budget (--stop_after_s; 0 = none), counted from the start of the script."""

  def __init__(self, budget_s: float):
    self.t0, self.budget_s = time.time(), float(budget_s)

  def left(self) -> float:
    return float("inf") if self.budget_s <= 0 else self.budget_s - (time.time() - self.t0)

  def check(self, what: str) -> None:
    if self.left() <= 0:
      raise OutOfTime(f"time budget of {self.budget_s:.0f} s reached before {what}")


def runs(args):
  """(arm, seed) in run order: every arm at the first seed, then the paired arms at the other seeds;
  eagle3_eqtime after the vsd arm of its seed (its step count comes from their wall times)."""
  arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
  for arm in arms:
    if arm not in ARMS:
      sys.exit(f"error: unknown arm {arm!r}; use some of {list(ARMS)}")
  if "eagle3_eqtime" in arms and not {"eagle3", "vsd"} <= set(arms):
    sys.exit("error: arm eagle3_eqtime needs the eagle3 and vsd arms (it gets vsd's wall time at eagle3's rate)")
  paired = set(args.paired_arms.split(",")) if args.paired_arms else {a for a in arms if a != "eagle3_eqtime"}
  order = sorted(arms, key=lambda a: a == "eagle3_eqtime")
  return [(a, seeds[0]) for a in order] + [(a, s) for s in seeds[1:] for a in order if a in paired]


def _read_json(path, default):
  if not os.path.isfile(path):
    return default
  with open(path) as f:
    return json.load(f)


def _report(workdir):
  return _read_json(os.path.join(workdir, "report.json"), None)


MONITORS = ("supported", "ess_frac", "chain_accept", "mean_u", "grad_norm")


def train_monitors(workdir) -> dict:
  """Means over the logged training steps of the E-step's monitors (VSD arms: supported fraction of anchors, ESS
  of the proposals' weights / S, MH acceptance, E_q[U]) and of the gradient norm, from OUT/<run>/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {k: float(np.mean([r[k] for r in rows if k in r])) for k in MONITORS if any(k in r for r in rows)}


def train_s(rep) -> float:
  """A run's training seconds (over every call that trained it)."""
  return rep.get("train_s_total", rep["stages"]["train_s"])


def train_s_per_step(rep) -> float:
  return train_s(rep) / max(int(rep["steps"]), 1)


def arm_steps(args, arm, seed, reports) -> int:
  """The optimizer steps of (arm, seed): --steps, or for eagle3_eqtime the EAGLE-3 steps that fit in the vsd
  arm's training time of the same seed (known once both ran; --steps until then, for the plan)."""
  e3, vsd = reports.get(f"eagle3_s{seed}"), reports.get(f"vsd_s{seed}")
  if arm != "eagle3_eqtime" or not (e3 and vsd):
    return args.steps
  return max(args.steps, int(round(args.steps * train_s_per_step(vsd) / train_s_per_step(e3))))


def run_overrides(args, arm, seed, steps, workdir) -> list:
  """The --config overrides of one run on configs/vsd_experiment.py (`python -m vsd_jax.train --config CONFIG`
  with them trains that run alone)."""
  init = [] if args.from_scratch else [f"--config.draft.init_from={args.base_draft}"]
  return ([f"--config.workdir={workdir}", f"--config.data.cache_dir={args.data_cache}"] + init +
          [f"--config.seed={seed}", f"--config.train.total_steps={steps}", f"--config.model.name={args.model}",
           f"--config.train.warmup_steps={args.warmup}", f"--config.train.lr={args.lr}",
           f"--config.train.batch_size={args.batch_size}", f"--config.eval.heldout_limit={args.heldout_limit}",
           f"--config.train.checkpoint_every={args.checkpoint_every}"] + ARMS[arm] + args.extra)


def finished(r, steps) -> bool:
  return r is not None and r.get("steps") == steps and r.get("stopped") == "done"


def run_until(cmd: list, clock: Clock) -> None:
  """Run a command; past the clock's budget it gets SIGTERM (the trainer saves a checkpoint and returns) and
  OutOfTime is raised. A failed run raises CalledProcessError."""
  proc = subprocess.Popen(cmd, cwd=REPO)
  try:
    proc.wait(timeout=None if clock.left() == float("inf") else max(clock.left(), 1.0))
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    raise OutOfTime("time budget reached during training: the run saved a checkpoint and will continue from it")
  if proc.returncode:
    raise subprocess.CalledProcessError(proc.returncode, cmd)


def train_runs(args, todo: list, clock: Clock, base: bool = False) -> None:
  """Train the runs `todo` [(arm, seed, steps)] (and with `base`, the base draft's held-out report) in ONE worker
  process (`--train_worker`): the target and the data load once for all of them. A run stopped by the time budget
  (same overrides) continues from its last checkpoint in the next call; a partial run of other settings starts
  again. Each run's OUT/<run>/attempts.json keeps its overrides and every call's seconds."""
  jobs = [{"kind": "base", "out": os.path.join(args.out, "base_heldout.json"), "draft": args.base_draft,
           "overrides": base_overrides(args)}] if base else []
  for arm, seed, steps in todo:
    workdir = os.path.join(args.out, f"{arm}_s{seed}")
    overrides = run_overrides(args, arm, seed, steps, workdir)
    if _read_json(os.path.join(workdir, "attempts.json"), {}).get("overrides") != overrides:
      if os.path.isdir(workdir):
        shutil.rmtree(workdir)
      os.makedirs(workdir)
      with open(os.path.join(workdir, "attempts.json"), "w") as f:
        json.dump({"overrides": overrides, "calls": []}, f, indent=1)
    jobs.append({"kind": "train", "workdir": workdir, "overrides": overrides})
  if not jobs:
    return
  clock.check("training " + (", ".join(f"{a}_s{s}" for a, s, _ in todo) or "the base's held-out report"))
  spec = os.path.join(args.out, "worker_jobs.json")
  with open(spec, "w") as f:
    json.dump({"args": vars(args), "jobs": jobs}, f, indent=1)
  cmd = [sys.executable, os.path.abspath(__file__), "--train_worker", spec]
  print("+", " ".join(cmd), file=sys.stderr, flush=True)
  run_until(cmd, clock)


def finish_report(workdir: str) -> dict:
  """A finished run's report with what the experiment adds: wall_s (over every call that trained it),
  train_s_total (when it took several), and the equivalent single-run command."""
  r = _report(workdir)
  attempts = _read_json(os.path.join(workdir, "attempts.json"), None)
  if attempts is None or "command" in r:   # a run of an earlier version of this script: as it was written
    return r
  r["wall_s"] = sum(c["wall_s"] for c in attempts["calls"])
  if len(attempts["calls"]) > 1:
    r["train_s_total"] = sum(c["train_s"] or 0.0 for c in attempts["calls"])
  r["command"] = " ".join(["-m", "vsd_jax.train", "--config", CONFIG] + attempts["overrides"])
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(r, f, indent=1)
  return r


def collect_reports(args) -> dict:
  """{run: report} of this call's runs that have finished (on disk), in run order, the base's first."""
  reports = {}
  base = os.path.join(args.out, "base_heldout.json")
  if not args.from_scratch and os.path.isfile(base):
    reports["base"] = _read_json(base, None)
  for arm, seed in runs(args):
    workdir = os.path.join(args.out, f"{arm}_s{seed}")
    if finished(_report(workdir), arm_steps(args, arm, seed, reports)):
      reports[f"{arm}_s{seed}"] = finish_report(workdir)
  return reports


def train_worker(spec_path: str) -> None:
  """--train_worker: the jobs of `train_runs` in this process, sharing one `vsd_jax.train.load_for_training`
  (every job has the same model, mesh and data settings); the summary and --mirror are brought up to date after
  each. Stops after a run that did not finish (the trainer caught SIGTERM and saved) or when SIGTERM came
  between runs."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  stop = []
  signal.signal(signal.SIGTERM, lambda *_: stop.append(True))   # the trainer's own handler covers its loop
  spec = _read_json(spec_path, {})
  args = argparse.Namespace(**spec["args"])
  loaded, shared = None, None
  for job in spec["jobs"]:
    if stop:
      break
    t0 = time.time()
    config = apply_overrides(load_config_file(CONFIG), job["overrides"], CONFIG)
    if job["kind"] == "train":
      check_inputs(config)
    key = json.dumps([config.model.to_dict(), config.mesh.to_dict(), config.data.to_dict()], default=str)
    if loaded is None or key != shared:
      loaded, shared = load_for_training(config), key
    if job["kind"] == "base":
      base_heldout(config, loaded.target, job["draft"], job["out"])
      publish(args, collect_reports(args), load_decoding(args))
      continue
    attempts_path = os.path.join(job["workdir"], "attempts.json")
    attempts = _read_json(attempts_path, {"overrides": job["overrides"], "calls": []})
    report = train(config, loaded)
    attempts["calls"].append(dict(wall_s=time.time() - t0, stopped=report.get("stopped"),
                                  train_s=report.get("stages", {}).get("train_s")))
    with open(attempts_path, "w") as f:
      json.dump(attempts, f, indent=1)
    publish(args, collect_reports(args), load_decoding(args))
    if report.get("stopped") != "done":
      break


def copy_base_cache(src: str, dst: str, model: str) -> None:
  """Copy the base's data cache to a writable folder and name its response file by the key this checkout
  computes for configs/vsd_experiment.py. The shipped base's cache was keyed by its GGUF's absolute path on
  the GPU machine (fixed since: `weights.identity.model_id` no longer depends on the install path); the responses
  themselves are the same target's (same packaged GGUF, same generation settings and chat template)."""
  shutil.copytree(src, dst)
  files = glob.glob(os.path.join(dst, "responses-*.jsonl"))
  if len(files) != 1:
    return
  config = load_config_file(CONFIG)
  config.data.cache_dir = dst
  config.model.name = model
  target = load_target(model, with_tokenizer=True)
  want = cache_path(data_cache_dir(config), model_id(target), gen_settings(resolve(config).data.regen),
                    prompt_encoder(target, config).template_text)
  if os.path.abspath(files[0]) != os.path.abspath(want):
    print(f"re-keying {files[0]} -> {want}", file=sys.stderr)
    os.rename(files[0], want)


def base_overrides(args) -> list:
  """The config of the base draft's held-out report: every arm's model, data and held-out settings."""
  return [f"--config.data.cache_dir={args.data_cache}", f"--config.model.name={args.model}",
          f"--config.eval.heldout_limit={args.heldout_limit}"] + args.extra


def base_heldout(config, target, draft_dir: str, out: str) -> None:
  """The base draft's held-out report on the same prompts and settings as every arm's (train.py's report),
  written to `out`."""
  _, params, d2t, t2d = load_draft(draft_dir, target.config)
  vocab = DraftVocab(d2t=d2t, t2d=t2d, counts=np.zeros(d2t.shape, np.int64), coverage=float("nan"))
  t0 = time.time()
  report = {"steps": 0, "heldout": heldout_report(config, target, vocab, params), "wall_s": time.time() - t0}
  with open(out + ".tmp", "w") as f:
    json.dump(report, f)
  os.replace(out + ".tmp", out)


def modes_at(args, temp: float) -> list:
  """The decoding modes run at temperature `temp`: --modes, or --t1_modes at T > 0 when given."""
  return (args.modes if temp == 0 or not args.t1_modes else args.t1_modes).split(",")


def entry_key(bench: str, temp: float, mode: str) -> str:
  """decoding.json's key of one decoded (set, temperature, mode)."""
  return f"{bench}@T={temp:g}/{mode}"


def evaluate(args, drafts: dict, results: dict, save, clock: Clock) -> dict:
  """{draft name: dir} -> results, filled in place: {draft: {"<bench>@T=<t>/<mode>": summary + per-prompt tau}}.

  Entries already in `results` are kept and not decoded again; save(results) runs after every new entry, so an
  interrupted evaluation resumes where it stopped (vanilla is decoded again for a set that still has work, so every
  speedup stays against vanilla in the same process). Past the clock's budget it raises OutOfTime before the next
  decode."""
  cfg = load_config_file(CONFIG)
  cfg.model.name = args.model
  base = Engine(cfg)   # the target in the decoding layout, as the evaluate CLI loads it; prompts encoded as the arms'
  trees = {"tree": TreeConfig(depth=args.tree_depth, top_k=args.top_k, total_tokens=args.total_tokens),  # training data
           "chain": TreeConfig(depth=args.chain_depth, mode="chain")}
  engines = {name: base.with_draft(path) for name, path in drafts.items()}
  for bench in args.bench.split(","):
    path = os.path.join(args.data_dir, bench, "question.jsonl")
    prompts = base.encode(read_prompt_file(path)[:args.num_prompts], path).ids
    for temp in [float(t) for t in args.temperature.split(",")]:
      modes = modes_at(args, temp)
      if all(entry_key(bench, temp, mode) in results.get(name, {}) for mode in modes for name in engines):
        continue
      clock.check(f"decoding {bench} at T={temp:g}")
      sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=temp, batch_size=args.eval_batch)
      van = base.vanilla(prompts, sampling)
      for mode in modes:
        for name, engine in engines.items():
          if entry_key(bench, temp, mode) in results.get(name, {}):
            continue
          clock.check(f"decoding {name} {entry_key(bench, temp, mode)}")
          spec = engine.with_shape(trees[mode]).speculative(prompts, sampling)
          r = summarize(van, spec)
          r["prompt_tau"] = [g.new_tokens / max(g.rounds, 1) for g in spec]
          r["prompt_tokens"] = [g.new_tokens for g in spec]
          r["prompt_rounds"] = [g.rounds for g in spec]
          results.setdefault(name, {})[entry_key(bench, temp, mode)] = r
          save(results)
          print(f"{name} {entry_key(bench, temp, mode)}: tau {r['tau']:.3f} speedup {r['speedup']:.2f}x "
                f"identical {r['identical_outputs']}/{r['prompts']}", file=sys.stderr, flush=True)
  return results


def paired_ratios(baseline: str, arms: dict, results: dict, keys: list) -> dict:
  """{arm: {"T=<t>/<mode>": ratio, ci95, prompts, seeds}}: each arm's tau over `baseline`'s on the same prompts and
  seeds, pooled over the sets of one (temperature, mode) that both decoded; {} without the baseline."""
  seed_of = lambda n: n.rsplit("_s", 1)[1] if "_s" in n else None
  out = {}
  if baseline not in arms:
    return out
  groups = sorted({k.split("@", 1)[1] for k in keys})
  base_seeds = {seed_of(b): b for b in arms[baseline]}
  for arm, names in arms.items():
    common = [n for n in names if seed_of(n) in base_seeds]
    if arm == baseline or not common:
      continue
    base_names = [base_seeds[seed_of(n)] for n in common]
    for g in groups:
      sets = [k for k in keys if k.endswith("@" + g) and all(k in results.get(n, {}) for n in common + base_names)]
      if not sets:
        continue
      per = lambda ns, f: np.mean([np.concatenate([results[n][k][f] for k in sets]) for n in ns], axis=0)
      ratio, lo, hi = bootstrap_ratio(per(common, "prompt_tokens"), per(common, "prompt_rounds"),
                                      per(base_names, "prompt_tokens"), per(base_names, "prompt_rounds"))
      out.setdefault(arm, {})[g] = dict(
          ratio=ratio, ci95=[lo, hi], prompts=int(sum(len(results[common[0]][k]["prompt_tau"]) for k in sets)),
          seeds=[seed_of(n) for n in common])
  return out


def summarise(args, reports: dict, results: dict) -> dict:
  """Per arm: held-out figures and per-set tau/speedup per seed, their mean/spread, and the paired ratios."""
  out = {"args": vars(args), "runs": {}, "arms": {}}
  for name, rep in reports.items():
    h = rep.get("heldout", {}) if rep else {}
    out["runs"][name] = dict(
        steps=rep.get("steps") if rep else 0, wall_s=rep.get("wall_s") if rep else None,
        train_s=train_s(rep) if rep and "stages" in rep else None,
        heldout_acc=h.get("step_acc"), tau_sim=h.get("tau_simulated"),
        chain_tau=h.get("chain", {}).get("tau_chain"), command=rep.get("command") if rep else None,
        monitors=train_monitors(os.path.join(args.out, name)) if name != "base" else {},
        decoding={k: {f: v[f] for f in ("tau", "speedup", "identical_outputs", "prompts", "n_alpha")}
                  for k, v in results.get(name, {}).items()})
  arms = {}
  for name in out["runs"]:
    arm = name.rsplit("_s", 1)[0] if "_s" in name else name
    arms.setdefault(arm, []).append(name)
  keys = sorted({k for r in results.values() for k in r})
  for arm, names in arms.items():
    rs = [out["runs"][n] for n in names]
    acc0 = [r["heldout_acc"][0] for r in rs if r["heldout_acc"]]
    entry = {"seeds": names, "heldout_acc0": acc0, "chain_tau": [r["chain_tau"] for r in rs if r["chain_tau"]]}
    for key in keys:
      taus = [results[n][key]["tau"] for n in names if key in results.get(n, {})]
      sps = [results[n][key]["speedup"] for n in names if key in results.get(n, {})]
      if taus:
        entry[key] = dict(tau_mean=float(np.mean(taus)), tau_min=min(taus), tau_max=max(taus),
                          speedup_mean=float(np.mean(sps)))
    out["arms"][arm] = entry
  for baseline in BASELINES:
    paired = paired_ratios(baseline, arms, results, keys)
    if baseline == BASELINE or paired:   # "paired_vs_eagle3" always (as before); the others when run
      out[f"paired_vs_{baseline}"] = paired
  return out


def markdown(summary: dict) -> str:
  runs = summary["runs"]
  keys = sorted({k for r in runs.values() for k in r["decoding"]})
  groups = sorted({k.split("@", 1)[1] for k in keys})
  head = ["run", "steps", "train s", "held-out acc@0", "tau_sim", "chain tau (held-out)", "supported", "ESS / S",
          "grad norm"]
  head += [f"tau {g} (mean of sets)" for g in groups] + [f"speedup {g}" for g in groups]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda x, f="{:.3f}": f.format(x) if x is not None else "-"
  for name, r in runs.items():
    row = [name, str(r["steps"]), fmt(r["train_s"], "{:.0f}"), fmt(r["heldout_acc"][0] if r["heldout_acc"] else None),
           fmt(r["tau_sim"]), fmt(r["chain_tau"])]
    mon = r.get("monitors", {})
    row += [fmt(mon.get("supported")), fmt(mon.get("ess_frac")), fmt(mon.get("grad_norm"), "{:.2f}")]
    for what in ("tau", "speedup"):
      for g in groups:
        v = [d[what] for k, d in r["decoding"].items() if k.endswith("@" + g)]
        row.append(fmt(float(np.mean(v)) if v else None, "{:.3f}" if what == "tau" else "{:.2f}x"))
    lines.append("| " + " | ".join(row) + " |")
  for g in groups:   # per set
    sets = sorted({k.split("@", 1)[0] for k in keys if k.endswith("@" + g)})
    lines += ["", f"tau per set, {g} (speedup in brackets; T=0: outputs identical to vanilla / prompts)", "",
              "| run | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name, r in runs.items():
      cells = []
      for b in sets:
        d = r["decoding"].get(f"{b}@{g}")
        same = f", {d['identical_outputs']}/{d['prompts']}" if d and g.startswith("T=0/") else ""
        cells.append(f"{d['tau']:.2f} ({d['speedup']:.2f}x{same})" if d else "-")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  for baseline in BASELINES:
    if not summary.get(f"paired_vs_{baseline}"):
      continue
    lines += ["", f"| arm / {baseline} (paired, same prompts) | " + " | ".join(groups) + " |",
              "|---|" + "---|" * len(groups)]
    for arm, by in summary[f"paired_vs_{baseline}"].items():
      cells = [f"{by[g]['ratio']:.3f} [{by[g]['ci95'][0]:.3f}, {by[g]['ci95'][1]:.3f}]" if g in by else "-"
               for g in groups]
      lines.append(f"| {arm} (seeds {','.join(next(iter(by.values()))['seeds'])}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def wanted_entries(args) -> set:
  """decoding.json keys this call asks for: every set x temperature x mode of that temperature."""
  temps = [float(t) for t in args.temperature.split(",")]
  return {entry_key(b, t, m) for b in args.bench.split(",") for t in temps for m in modes_at(args, t)}


def decoding_settings(args) -> dict:
  return {k: getattr(args, k) for k in ("num_prompts", "max_new_tokens", "tree_depth", "top_k", "total_tokens",
                                        "chain_depth", "eval_batch")}


def load_decoding(args) -> dict:
  """The decoded entries kept in OUT/decoding.json for these settings (none when they were decoded otherwise, or
  with --skip_eval)."""
  saved = {} if args.skip_eval else _read_json(os.path.join(args.out, "decoding.json"), {})
  return saved.get("results", {}) if saved.get("settings") == decoding_settings(args) else {}


def decoded_runs(args, reports: dict) -> list:
  """The runs decoded and summarised: --eval_runs, or every run that has a report."""
  return args.eval_runs.split(",") if args.eval_runs else list(reports)


def run_names(args) -> list:
  """Every run of this call in order, base first (none with --from_scratch)."""
  return ([] if args.from_scratch else ["base"]) + [f"{a}_s{s}" for a, s in runs(args)]


def plan(args, results: dict) -> dict:
  """What this call has left -- runs to train (optimizer steps, compiles) and decoded entries -- and the GPU time
  that needs at GPU_RATES. Finished runs and entries (on disk) count nothing. The training worker loads the target
  and the data once for all runs; decoding loads the target once more (its decoding layout)."""
  r = GPU_RATES
  heldout = (args.heldout_limit if args.heldout_limit > 0 else 80) * r["heldout_s_per_prompt"]
  rows, reports = [], {}
  if not args.from_scratch and not os.path.isfile(os.path.join(args.out, "base_heldout.json")):
    rows.append(dict(run="base", steps=0, compiles=1, est_s=heldout))
  for arm, seed in runs(args):
    name = f"{arm}_s{seed}"
    rep = _report(os.path.join(args.out, name))
    steps = arm_steps(args, arm, seed, reports)
    if finished(rep, steps):
      reports[name] = rep
      continue
    est = r["train_compile_s"] + heldout + steps * args.batch_size * r["step_s_per_seq"] * step_cost(arm)
    rows.append(dict(run=name, steps=steps, compiles=2, est_s=est))
  entries, combos, vanilla = 0, set(), set()
  if not args.skip_eval:
    names = args.eval_runs.split(",") if args.eval_runs else run_names(args)
    for n in names:
      for key in sorted(wanted_entries(args) - set(results.get(n, {}))):
        entries += 1
        combos.add((n, key.split("@", 1)[1]))
        vanilla.add(key.rsplit("/", 1)[0])
  tokens = (entries + len(vanilla)) * args.num_prompts * args.max_new_tokens
  decode_s = ((r["load_s"] if entries else 0.0) + (len(combos) + len(vanilla)) * r["compile_s"] +
              tokens * r["decode_s_per_token"])
  train_s = sum(x["est_s"] for x in rows) + (r["load_s"] + r["data_s"] if rows else 0.0)
  return dict(train_runs=rows, optimizer_steps=sum(x["steps"] for x in rows),
              compiles=sum(x["compiles"] for x in rows) + len(combos) + len(vanilla), decoded_entries=entries,
              vanilla_decodes=len(vanilla), decoded_tokens=tokens, est_train_s=train_s, est_decode_s=decode_s,
              est_gpu_s=train_s + decode_s, rates=r)


def print_plan(p: dict) -> None:
  print(f"plan: {len(p['train_runs'])} runs to train ({p['optimizer_steps']} optimizer steps), "
        f"{p['decoded_entries']} decoded entries + {p['vanilla_decodes']} vanilla decodes "
        f"({p['decoded_tokens']} tokens), {p['compiles']} compiles", file=sys.stderr)
  for x in p["train_runs"]:
    print(f"  {x['run']:<22} {x['steps']:>6} steps  ~{x['est_s']:.0f} s", file=sys.stderr)
  print(f"  estimated GPU time: {p['est_gpu_s']:.0f} s (training {p['est_train_s']:.0f} s, decoding "
        f"{p['est_decode_s']:.0f} s; GPU_RATES: training measured on the H200, decoding assumed)",
        file=sys.stderr, flush=True)


def publish(args, reports: dict, results: dict, stopped: str = "") -> dict:
  """Write OUT/summary.{json,md} from what exists, and copy it, decoding.json, the plan and every run's report,
  metrics and attempts to --mirror (a device call's $OUT: what a call cut off at its limit still returns)."""
  names = decoded_runs(args, reports)
  wanted = wanted_entries(args)
  summary = summarise(args, reports, {n: {k: v for k, v in results.get(n, {}).items() if k in wanted}
                                      for n in names})
  if stopped:
    summary["stopped"] = stopped
  md = markdown(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(md + "\n")
  if args.mirror:
    for rel in ["summary.json", "summary.md", "decoding.json", "plan.json", "base_heldout.json"] + [
        os.path.join(n, f) for n in reports if n != "base" for f in ("report.json", "metrics.jsonl", "attempts.json")]:
      src = os.path.join(args.out, rel)
      if os.path.isfile(src):
        os.makedirs(os.path.dirname(os.path.join(args.mirror, rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(args.mirror, rel))
  return summary


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base_draft", default=os.path.join(REPO, "..", "shared", "drafts", "smollm2-eagle3-gpu-1500",
                                                       "draft"))
  ap.add_argument("--model", default="smollm2-135m-instruct", help="the target: registry name or GGUF/HF path")
  ap.add_argument("--data_cache", default=os.path.join(REPO, "runs", "exp_cache"),
                  help="writable response cache (copied from --base_cache when it does not exist)")
  ap.add_argument("--base_cache", default=None, help="default: <base_draft>/../data_cache")
  ap.add_argument("--out", default=os.path.join(REPO, "runs", "vsd_exp15"))
  ap.add_argument("--arms", default="eagle3,vsd_exact,vsd")
  ap.add_argument("--paired_arms", default="", help="arms run at every seed (default: all but eagle3_eqtime)")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--warmup", type=int, default=4)
  ap.add_argument("--lr", type=float, default=2e-4)
  ap.add_argument("--heldout_limit", type=int, default=24)
  ap.add_argument("--bench", default="mt_bench,humaneval,gsm8k,alpaca,sum,qa")
  ap.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "eval", "eagle"))
  ap.add_argument("--temperature", default="0,1")
  ap.add_argument("--modes", default="tree,chain")
  ap.add_argument("--t1_modes", default=None, help="decoding modes at T>0 (default --modes)")
  ap.add_argument("--eval_batch", type=int, default=1, help="prompts decoded together (tau does not depend on it; "
                  "speedups are for this batch size)")
  ap.add_argument("--num_prompts", type=int, default=10)
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--tree_depth", type=int, default=SHAPE_DEFAULTS["depth"])   # the one shape-defaults table
  ap.add_argument("--top_k", type=int, default=SHAPE_DEFAULTS["top_k"])
  ap.add_argument("--total_tokens", type=int, default=SHAPE_DEFAULTS["total_tokens"])
  ap.add_argument("--chain_depth", type=int, default=SHAPE_DEFAULTS["depth"])
  ap.add_argument("--eval_runs", default="", help="comma-separated runs to decode with (default: all, and the base)")
  ap.add_argument("--skip_eval", action="store_true")
  ap.add_argument("extra", nargs="*", help="more --config.x=y overrides for every arm (after --)")
  ap.add_argument("--from_scratch", action="store_true",
                  help="every arm starts from the seed's random init, not --base_draft (no `base` run)")
  ap.add_argument("--checkpoint_every", type=int, default=100000,
                  help="training checkpoints (a run stopped by --stop_after_s continues from the last one)")
  ap.add_argument("--stop_after_s", type=float, default=0.0,
                  help="stop starting new work after this many seconds, save, summarise, exit (0 = no limit)")
  ap.add_argument("--mirror", default="", help="a folder that receives the summary and reports as they finish")
  ap.add_argument("--plan_only", action="store_true", help="print what is left and its estimated GPU time, exit")
  ap.add_argument("extra", nargs="*", help="more --config.x=y overrides for every arm (after --)")
  return ap.parse_args(argv)


def main():
  if len(sys.argv) == 3 and sys.argv[1] == "--train_worker":
    return train_worker(sys.argv[2])
  args = parse_args()
  clock = Clock(args.stop_after_s)
  if not args.from_scratch and not os.path.isfile(os.path.join(args.base_draft, "draft_config.json")):
    sys.exit(f"error: --base_draft {args.base_draft!r} holds no trained draft (draft_config.json); pass the "
             "`draft` folder of ../shared/drafts/smollm2-eagle3-gpu-1500 or a <workdir>/draft of vsd_jax.train")
  runs(args)   # unknown arms fail here, before anything is copied or loaded
  if not os.path.isdir(args.data_cache):
    src = args.base_cache or os.path.join(os.path.dirname(os.path.abspath(args.base_draft)), "data_cache")
    if not os.path.isdir(src):
      sys.exit(f"error: --data_cache {args.data_cache!r} does not exist and there is no {src!r} to copy it from; "
               "pass --base_cache <the base draft's data_cache>")
    copy_base_cache(src, args.data_cache, args.model)
  os.makedirs(args.out, exist_ok=True)
  if args.mirror:
    os.makedirs(args.mirror, exist_ok=True)
  # Decoding results are kept per run and "<set>@T=<t>/<mode>" in OUT/decoding.json with the settings that
  # shape every entry, so a later call that adds arms, sets, temperatures or modes, or resumes a stopped one,
  # decodes only what is missing; vanilla is rerun with them (speedups stay same-process).
  results = load_decoding(args)
  left = plan(args, results)
  with open(os.path.join(args.out, "plan.json"), "w") as f:
    json.dump(left, f, indent=1)
  print_plan(left)
  if args.plan_only:
    return
  stopped = ""
  try:
    # One worker trains every run left (and the base's held-out report); eagle3_eqtime's steps need the vsd
    # arm's time, so those runs get a second worker.
    base = not args.from_scratch and not os.path.isfile(os.path.join(args.out, "base_heldout.json"))
    order = runs(args)
    for batch in ([r for r in order if r[0] != "eagle3_eqtime"], [r for r in order if r[0] == "eagle3_eqtime"]):
      done = collect_reports(args)
      todo = [(a, s, arm_steps(args, a, s, done)) for a, s in batch if f"{a}_s{s}" not in done]
      train_runs(args, todo, clock, base=base)
      base = False
    reports = collect_reports(args)
    publish(args, reports, results)
    if not args.skip_eval:
      names = decoded_runs(args, reports)
      path = os.path.join(args.out, "decoding.json")

      def save(res):
        with open(path + ".tmp", "w") as f:
          json.dump({"settings": decoding_settings(args), "results": res}, f)
        os.replace(path + ".tmp", path)
        publish(args, reports, res)

      todo = [n for n in names if not wanted_entries(args) <= set(results.get(n, {}))]
      if todo:  # the target and drafts load only when something is left to decode
        drafts = {n: args.base_draft if n == "base" else os.path.join(args.out, n, "draft") for n in todo}
        evaluate(args, drafts, results, save, clock)
  except OutOfTime as e:
    stopped = str(e)
    print(f"stopped: {stopped}; the same command again resumes where this one stopped", file=sys.stderr, flush=True)
  summary = publish(args, collect_reports(args), results, stopped)
  print(markdown(summary))


if __name__ == "__main__":
  main()

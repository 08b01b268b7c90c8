"""benchmarks/vsd_experiment.py's machinery for time-limited device calls, without training anything: the time
budget stops a training subprocess with SIGTERM (which saves), the plan counts only what is left, and the summary
and reports reach the mirror folder as they are written."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exp():
  spec = importlib.util.spec_from_file_location("vsd_experiment", os.path.join(REPO, "benchmarks", "vsd_experiment.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_run_until_stops_a_run_with_sigterm(exp, tmp_path):
  """A child that saves on SIGTERM (as the trainer does) is stopped at the budget and has saved; OutOfTime says so."""
  marker = tmp_path / "saved"
  child = textwrap.dedent(f"""
      import signal, sys, time
      def stop(*_):
          open({str(marker)!r}, "w").write("step 7")
          sys.exit(0)
      signal.signal(signal.SIGTERM, stop)
      time.sleep(60)
  """)
  clock = exp.Clock(1.0)
  with pytest.raises(exp.OutOfTime, match="checkpoint"):
    exp.run_until([sys.executable, "-c", child], clock)
  assert marker.read_text() == "step 7"
  exp.run_until([sys.executable, "-c", "pass"], exp.Clock(0))          # no budget: runs to the end
  with pytest.raises(subprocess.CalledProcessError):
    exp.run_until([sys.executable, "-c", "raise SystemExit(3)"], exp.Clock(0))
  with pytest.raises(exp.OutOfTime, match="before training x"):
    exp.Clock(1e-9).check("training x")


def _args(exp, out, *more):
  return exp.parse_args(["--out", str(out), "--arms", "eagle3,vsd,lk", "--seeds", "0,1", "--steps", "10",
                         "--batch_size", "4", "--from_scratch", "--bench", "mt_bench", "--num_prompts", "2",
                         "--max_new_tokens", "8", *more])


def _finished(out, name, steps):
  os.makedirs(out / name, exist_ok=True)
  (out / name / "report.json").write_text(json.dumps(dict(
      stopped="done", steps=steps, stages={"train_s": 5.0}, heldout={"step_acc": [0.4], "tau_simulated": 1.6})))


def test_plan_counts_only_what_is_left(exp, tmp_path):
  args = _args(exp, tmp_path)
  full = exp.plan(args, {})
  assert [r["run"] for r in full["train_runs"]] == ["eagle3_s0", "vsd_s0", "lk_s0", "eagle3_s1", "vsd_s1", "lk_s1"]
  assert full["optimizer_steps"] == 60
  # 6 runs x 1 set x (T=0 tree, chain; T=1 tree, chain), and one vanilla decode per (set, temperature)
  assert (full["decoded_entries"], full["vanilla_decodes"]) == (24, 2)
  assert full["decoded_tokens"] == (24 + 2) * 2 * 8
  est = {r["run"]: r["est_s"] for r in full["train_runs"]}
  step = 10 * 4 * exp.GPU_RATES["step_s_per_seq"]
  assert est["vsd_s0"] - est["eagle3_s0"] == pytest.approx(step * (exp.SAMPLED_STEP_COST - 1))
  assert est["lk_s0"] == pytest.approx(est["eagle3_s0"])
  assert full["est_gpu_s"] == pytest.approx(full["est_train_s"] + full["est_decode_s"])
  loads = exp.GPU_RATES["load_s"] + exp.GPU_RATES["data_s"]     # once for every run: one training worker
  assert full["est_train_s"] == pytest.approx(sum(est.values()) + loads)
  _finished(tmp_path, "eagle3_s0", 10)
  _finished(tmp_path, "vsd_s1", 9)          # finished with other settings: still to do
  results = {"lk_s0": {"mt_bench@T=0/tree": {}, "mt_bench@T=0/chain": {}}}
  left = exp.plan(args, results)
  assert [r["run"] for r in left["train_runs"]] == ["vsd_s0", "lk_s0", "eagle3_s1", "vsd_s1", "lk_s1"]
  assert (left["optimizer_steps"], left["decoded_entries"]) == (50, 22)
  assert exp.plan(_args(exp, tmp_path, "--skip_eval"), {})["decoded_entries"] == 0
  # With a base draft, the base's held-out report and its decoding are part of the plan.
  based = exp.plan(exp.parse_args(["--out", str(tmp_path / "b"), "--arms", "eagle3", "--seeds", "0", "--bench",
                                   "mt_bench"]), {})
  assert [r["run"] for r in based["train_runs"]] == ["base", "eagle3_s0"]
  assert based["decoded_entries"] == 2 * 4


def _entry(rng, prompts=6):
  tokens = rng.integers(20, 40, prompts)
  rounds = rng.integers(10, 20, prompts)
  return dict(tau=float(tokens.sum() / rounds.sum()), speedup=1.0, identical_outputs=prompts, prompts=prompts,
              n_alpha=[0.5], prompt_tau=list(tokens / rounds), prompt_tokens=tokens.tolist(),
              prompt_rounds=rounds.tolist())


def test_publish_mirrors_partial_results_and_pairs_with_lk(exp, tmp_path):
  out, mirror = tmp_path / "exp", tmp_path / "OUT"
  args = _args(exp, out, "--mirror", str(mirror), "--seeds", "0", "--temperature", "0", "--modes", "chain")
  os.makedirs(mirror)
  rng = np.random.default_rng(0)
  reports = {}
  for name in ("eagle3_s0", "vsd_s0"):
    _finished(out, name, 10)
    (out / name / "metrics.jsonl").write_text(json.dumps({"step": 5, "grad_norm": 1.5}) + "\n")
    reports[name] = json.loads((out / name / "report.json").read_text())
  results = {n: {"mt_bench@T=0/chain": _entry(rng)} for n in reports}
  summary = exp.publish(args, reports, results, stopped="time budget of 10 s reached before training lk_s0")
  for rel in ("summary.json", "summary.md", "eagle3_s0/report.json", "vsd_s0/metrics.jsonl"):
    assert (mirror / rel).is_file(), rel
  mirrored = json.loads((mirror / "summary.json").read_text())
  assert mirrored["stopped"].startswith("time budget") and mirrored == json.loads(json.dumps(summary, default=float))
  assert set(mirrored["paired_vs_eagle3"]) == {"vsd"} and "paired_vs_lk" not in mirrored
  # Once lk has run, every other arm is also paired against it, and the markdown has its table.
  reports["lk_s0"] = reports["eagle3_s0"]
  results["lk_s0"] = {"mt_bench@T=0/chain": _entry(rng)}
  summary = exp.publish(args, reports, results)
  assert set(summary["paired_vs_lk"]) == {"eagle3", "vsd"} and "stopped" not in summary
  ratio = summary["paired_vs_lk"]["vsd"]["T=0/chain"]["ratio"]
  v, lk = results["vsd_s0"]["mt_bench@T=0/chain"], results["lk_s0"]["mt_bench@T=0/chain"]
  want = (sum(v["prompt_tokens"]) / sum(v["prompt_rounds"])) / (sum(lk["prompt_tokens"]) / sum(lk["prompt_rounds"]))
  assert ratio == pytest.approx(want)
  assert "| arm / lk (paired, same prompts) |" in (mirror / "summary.md").read_text()


def test_apply_overrides_reads_each_field_as_its_type():
  from vsd_jax.cli_config import ConfigError, apply_overrides, load_config_file
  c = load_config_file(os.path.join(REPO, "configs", "vsd_experiment.py"))
  apply_overrides(c, ["--config.method=vsd", "--config.vsd.arw=False", "--config.train.lr=6e-4",
                      "--config.data.buckets=(128,256)", "--config.vsd.num_paths=4", "--config.draft.objective=lk_alpha",
                      "--config.draft.init_from="])
  assert (c.method, c.vsd.arw, c.train.lr, c.data.buckets, c.vsd.num_paths, c.draft.objective, c.draft.init_from) == (
      "vsd", False, 6e-4, (128, 256), 4, "lk_alpha", "")
  for bad, named in [("--config.vsd.arw=maybe", "vsd.arw"), ("--config.vsd.num_paths=4.5", "vsd.num_paths"),
                     ("--config.vsd.nope=1", "'nope'"), ("--config.method", "--config.method")]:
    with pytest.raises(ConfigError, match=named):
      apply_overrides(c, [bad])


def test_collect_reports_finishes_each_run_once(exp, tmp_path):
  """Finished runs (this call's steps) are collected in run order with the experiment's additions: wall_s over
  the calls that trained them, train_s_total when several did, and the equivalent single-run command."""
  args = _args(exp, tmp_path, "--seeds", "0")
  overrides = exp.run_overrides(args, "vsd", 0, 10, str(tmp_path / "vsd_s0"))
  assert "--config.method=vsd" in overrides and not any("init_from" in o for o in overrides)   # --from_scratch
  _finished(tmp_path, "vsd_s0", 10)
  (tmp_path / "vsd_s0" / "attempts.json").write_text(json.dumps({"overrides": overrides, "calls": [
      dict(wall_s=30.0, stopped="preempted", train_s=20.0), dict(wall_s=12.0, stopped="done", train_s=5.0)]}))
  _finished(tmp_path, "lk_s0", 7)          # other settings: not this call's
  reports = exp.collect_reports(args)
  assert list(reports) == ["vsd_s0"]
  r = reports["vsd_s0"]
  assert (r["wall_s"], r["train_s_total"], exp.train_s(r)) == (42.0, 25.0, 25.0)
  assert r["command"].startswith("-m vsd_jax.train --config ") and r["command"].endswith(" ".join(overrides))
  assert exp.collect_reports(args)["vsd_s0"] == r          # written once: collecting again changes nothing

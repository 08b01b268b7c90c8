"""The decoding engine and its callers: inputs checked before anything loads (each error naming the flag), one
calibration policy (the packaged prompts when the user's cannot calibrate, recorded in the output), generate's and
evaluate's outputs written as work finishes and resumed, and evaluate's picture.

The CLI runs use the random tiny LLaVA (configs/llava.py:tiny, text prompts) and a random draft with a fixed or faked
shape, so nothing is timed; evaluate runs in subprocesses (generate and evaluate define the same absl flags, so they
cannot both be imported into one process).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_generate_images import LLAVA_CONFIG, _adaptor_draft, run_generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MODEL = "--config.model.name=/no/such/model.gguf"  # loading it fails: an error naming a flag came first


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  from vsd_jax.weights.tiny_llava import make_tiny_llava
  return make_tiny_llava(str(tmp_path_factory.mktemp("cache") / "tiny-llava-random"))


@pytest.fixture(scope="module")
def draft_dir(tiny_dir, tmp_path_factory):
  from vsd_jax.weights import load_target
  return _adaptor_draft(load_target(tiny_dir), tmp_path_factory.mktemp("draft") / "d")


def _prompt_file(path, n, tag="q"):
  path.write_text("".join(json.dumps({"question_id": f"{tag}{i}", "turns": [f"Say something about number {i}."]})
                          + "\n" for i in range(n)))
  return str(path)


# ---- every input checked before the target loads -----------------------------------------------------------------

@pytest.mark.parametrize("flags,named", [
    (["--max_new_tokens", "0"], "--max_new_tokens=0"),
    (["--max_new_tokens", "-5"], "--max_new_tokens=-5"),
    (["--temperature", "-1"], "--temperature=-1"),
    (["--temperature", "nan"], "--temperature=nan"),
    (["--top_p", "0"], "--top_p=0"),
    (["--top_p", "1.5"], "--top_p=1.5"),
    (["--batch_size", "0"], "--batch_size=0"),
    (["--limit", "0"], "--limit=0"),
    (["--calib_prompts", "0"], "--calib_prompts=0"),
    (["--draft", "/no/such/draft"], "--draft='/no/such/draft'"),
])
def test_generate_rejects_bad_flags_before_loading(tmp_path, monkeypatch, flags, named):
  from vsd_jax import engine
  monkeypatch.setattr(engine, "load_decoding_target", lambda *a, **k: pytest.fail("the target was loaded"))
  prompts = _prompt_file(tmp_path / "p.jsonl", 2)
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    run_generate(str(tmp_path), "--prompts", prompts, "--output", str(tmp_path / "o.jsonl"), *flags)
  assert named in str(e.value), str(e.value)
  assert not (tmp_path / "o.jsonl").exists()


def test_generate_rejects_an_output_directory_before_loading(tmp_path, monkeypatch):
  from vsd_jax import engine
  monkeypatch.setattr(engine, "load_decoding_target", lambda *a, **k: pytest.fail("the target was loaded"))
  prompts = _prompt_file(tmp_path / "p.jsonl", 2)
  (tmp_path / "outdir").mkdir()
  with pytest.raises(ValueError, match=r"--output='.*outdir' is a directory; pass a file path"):
    run_generate(str(tmp_path), "--prompts", prompts, "--output", str(tmp_path / "outdir"))


def _evaluate(args, env=None, driver=""):
  """python -m vsd_jax.evaluate (or a driver that patches it first, then runs its main through run_app)."""
  code = driver + "\nfrom vsd_jax import evaluate\nfrom vsd_jax.cli_config import run_app\nrun_app(evaluate.main)\n"
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **(env or {})))


@pytest.mark.parametrize("flags,named", [
    (["--num_prompts", "0"], "--num_prompts=0"),
    (["--bench", "BENCH,nonsense"], "--bench 'nonsense'"),
    (["--temperature", "0,-1"], "--temperature=-1"),
    (["--max_new_tokens", "0"], "--max_new_tokens=0"),
    (["--output_dir", "FILE"], "is a file, not a directory"),
])
def test_evaluate_rejects_bad_flags_before_loading(tmp_path, flags, named):
  bench = _prompt_file(tmp_path / "set_a.jsonl", 2)
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "draft_config.json").write_text("{}")
  (tmp_path / "a_file").write_text("")
  flags = [f.replace("BENCH", bench).replace("FILE", str(tmp_path / "a_file")) for f in flags]
  args = ["--config", LLAVA_CONFIG, NO_MODEL, "--draft", str(tmp_path / "d"), "--bench", bench,
          "--output_dir", str(tmp_path / "eval")] + flags
  r = _evaluate(args)
  assert r.returncode != 0 and named in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "/no/such/model.gguf" not in r.stderr  # failed before loading the target
  assert not (tmp_path / "eval" / "results.json").exists()


# ---- one calibration policy ---------------------------------------------------------------------------------------

def test_calibration_falls_back_to_the_packaged_prompts(tiny_dir):
  """No text prompt left (none, or image prompts only): the packaged prompts, named in the description; a text prompt
  left: the user's."""
  from vsd_jax.engine import PACKAGED_CALIBRATION, Engine
  from vsd_jax.cli_config import load_config_file
  from vsd_jax.weights import load_target
  eng = Engine(load_config_file(LLAVA_CONFIG), target=load_target(tiny_dir))
  for candidates in ([], [(7, "<image>\nWhat is this?", ("x.png",))]):
    c = eng.calibration_prompts(candidates, 3)
    assert c.source == "packaged" and c.origin == PACKAGED_CALIBRATION and len(c.ids) == 8  # at least 8
    assert c.describe()["question_ids"] == [f"calibration-{i}" for i in range(8)]
    assert all(len(ids) > 5 for ids in c.ids)
  c = eng.calibration_prompts([(7, "<image>\nWhat is this?", ("x.png",)), (8, "Count to three.", ())], 3, "f.jsonl")
  assert c.source == "user" and c.names == [8] and c.origin == "f.jsonl"
  assert c.ids == [eng.encoder.encode_user("Count to three.")]


def test_packaged_calibration_prompts_are_not_evaluation_prompts(data_root):
  from vsd_jax.data.prompt_file import read_prompt_file
  from vsd_jax.engine import PACKAGED_CALIBRATION
  ours = {m for _, m in read_prompt_file(PACKAGED_CALIBRATION)}
  assert len(ours) >= 8
  eval_dir = os.path.join(data_root, "eval", "eagle")
  for name in (os.listdir(eval_dir) if os.path.isdir(eval_dir) else []):
    path = os.path.join(eval_dir, name, "question.jsonl")
    if os.path.isfile(path):
      assert not ours & {m for _, m in read_prompt_file(path)}, name


# ---- outputs written as work finishes, and resumed ----------------------------------------------------------------

@pytest.mark.slow  # generate runs (the tiny LLaVA's decoder compiles): about 30 s on 2 idle cores
def test_generate_resumes_after_a_kill_without_generating_the_first_batch_again(tiny_dir, tmp_path, monkeypatch):
  from vsd_jax import engine
  prompts = _prompt_file(tmp_path / "p.jsonl", 4)
  common = ["--prompts", prompts, "--max_new_tokens", "4", "--temperature", "0", "--batch_size", "2"]
  run_generate(tiny_dir, *common, "--output", str(tmp_path / "whole.jsonl"))
  whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
  real = engine.run_batches
  decoded = []

  def killed_after_first_batch(prompts_, *a, on_batch=None, **k):
    def then_kill(idx, gens):
      on_batch(idx, gens)
      raise KeyboardInterrupt("killed after the first batch")
    decoded.append(len(prompts_))
    return real(prompts_, *a, on_batch=then_kill, **k)

  def counting(prompts_, *a, **k):
    decoded.append(len(prompts_))
    return real(prompts_, *a, **k)

  out = tmp_path / "o.jsonl"
  monkeypatch.setattr(engine, "run_batches", killed_after_first_batch)
  with pytest.raises(KeyboardInterrupt):
    run_generate(tiny_dir, *common, "--output", str(out))
  first = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(first) == 2 and decoded == [4]
  meta = json.loads((tmp_path / "o.jsonl.meta.json").read_text())
  assert meta["batch_size"] == 2 and meta["settings"]["max_new_tokens"] == 4
  with open(out, "a") as f:
    f.write('{"question_id": "q3", "prom')  # a kill while writing the next line
  monkeypatch.setattr(engine, "run_batches", counting)
  run_generate(tiny_dir, *common, "--output", str(out))
  assert decoded == [4, 2]  # the rerun decoded the two prompts left, not the first batch
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["question_id"] for r in rows] == ["q0", "q1", "q2", "q3"]  # prompt order
  assert [r["output_ids"] for r in rows] == [r["output_ids"] for r in whole]
  assert all(r in rows for r in first)
  run_generate(tiny_dir, *common, "--output", str(out))  # all done: nothing decoded
  assert decoded == [4, 2]
  with pytest.raises(ValueError, match=r"written with max_new_tokens=4 and this run asks for max_new_tokens=5"):
    run_generate(tiny_dir, *common[:-6], "--max_new_tokens", "5", "--temperature", "0", "--batch_size", "2",
                 "--output", str(out))


def test_jsonl_output_resumes_drops_a_torn_line_and_refuses_other_settings(tmp_path):
  """generate's output, without a model: rows appended per batch survive a rerun, a cut-off last line is dropped
  (its prompt generated again), other settings or a foreign file are errors naming the setting / file."""
  from vsd_jax.eval.files import JsonlOutput
  path = str(tmp_path / "o.jsonl")
  row = lambda q: dict(question_id=q, prompt_ids=[1, q], output_ids=[q])  # noqa: E731
  out = JsonlOutput(path, dict(max_new_tokens=4))
  out.start(dict(tree=None))
  out.append([row(2), row(0)])
  with open(path, "a") as f:
    f.write('{"question_id": 1, "pro')
  again = JsonlOutput(path, dict(max_new_tokens=4))
  assert set(again.finished) == {again.key(0, [1, 0]), again.key(2, [1, 2])}
  again.append([row(1)])
  keys = [again.key(q, [1, q]) for q in range(3)]
  assert [r["question_id"] for r in again.finish(keys)] == [0, 1, 2]
  assert [json.loads(line)["question_id"] for line in open(path)] == [0, 1, 2]
  with pytest.raises(ValueError, match=r"written with max_new_tokens=4 and this run asks for max_new_tokens=8"):
    JsonlOutput(path, dict(max_new_tokens=8))
  (tmp_path / "foreign.jsonl").write_text("{}\n")
  with pytest.raises(ValueError, match=r"exists but has no foreign.jsonl.meta.json"):
    JsonlOutput(str(tmp_path / "foreign.jsonl"), {})


EVALUATE_DRIVER = r"""
import os
from vsd_jax import engine
from vsd_jax.decoding import autotune
from vsd_jax.decoding.tree import TreeConfig
def fake_choice(*args, **kwargs):  # the autotuner's outcome without timing anything; the calibration it was given
  with open(os.environ["CALIB_LOG"], "a") as f:
    f.write(f"{len(args[5])} {kwargs['calibration']['source']}\n")
  row = dict(name="chain d2", tau=2.0, verify_ms=1.0, draft_side_ms=1.0, round_ms=2.0, round_steps=1.3, speedup=1.5,
             verify_timed=True)
  return autotune.Choice(TreeConfig(depth=2, mode="chain"), 1.5, [row], "key")
autotune.choose_shape = fake_choice
real_vanilla, real_spec = engine.Engine.vanilla, engine.Engine.speculative
def vanilla(self, *a, **k):
  with open(os.environ["CALIB_LOG"], "a") as f:
    f.write("vanilla\n")
  return real_vanilla(self, *a, **k)
def speculative(self, *a, **k):
  if os.environ.get("KILL_AT") == "speculative" and os.path.exists(os.environ["RESULTS"]):
    raise KeyboardInterrupt("killed during the second set")
  return real_spec(self, *a, **k)
engine.Engine.vanilla, engine.Engine.speculative = vanilla, speculative
"""


@pytest.mark.slow  # evaluate runs (the tiny LLaVA's decoders compile): about a minute on 2 idle cores
def test_evaluate_resumes_per_set_and_calibrates_on_packaged_prompts(tiny_dir, draft_dir, tmp_path):
  """Two sets of 2 prompts, all scored: the shape is calibrated on the packaged prompts (recorded in results.json);
  killed in the second set, results.json holds the first set's entry; the rerun decodes only the second set.
  --max_new_tokens and --temperature unset: config.generate's are used."""
  sets = [_prompt_file(tmp_path / f"set_{x}.jsonl", 2, tag=x) for x in "ab"]
  out = tmp_path / "eval"
  log = tmp_path / "calls.log"
  env = dict(VSD_JAX_CACHE=os.path.dirname(tiny_dir), CALIB_LOG=str(log), RESULTS=str(out / "results.json"))
  args = ["--config", LLAVA_CONFIG, "--config.generate.max_new_tokens=5", "--config.generate.temperature=0.0",
          "--draft", draft_dir, "--bench", ",".join(sets), "--num_prompts", "2", "--output_dir", str(out)]
  r = _evaluate(args, dict(env, KILL_AT="speculative"), EVALUATE_DRIVER)
  assert r.returncode != 0 and "killed during the second set" in r.stderr, r.stderr[-3000:]
  saved = json.loads((out / "results.json").read_text())
  assert list(saved["results"]) == ["set_a@T=0"]
  calib = saved["meta"]["calibration"]
  assert calib["source"] == "packaged" and calib["origin"].endswith("calibration_prompts.jsonl")
  assert calib["question_ids"] == [f"calibration-{i}" for i in range(8)]  # at least 8 (2 sets x 2 asked)
  assert saved["meta"]["max_new_tokens"] == 5 and saved["meta"]["shape_source"] == "autotune"
  assert log.read_text().splitlines() == ["8 packaged", "vanilla", "vanilla"]
  log.write_text("")
  r = _evaluate(args, env, EVALUATE_DRIVER)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming" in r.stderr and log.read_text().splitlines() == ["8 packaged", "vanilla"]  # set b only
  res = json.loads((out / "results.json").read_text())["results"]
  assert list(res) == ["set_a@T=0", "set_b@T=0"] and res["set_a@T=0"] == saved["results"]["set_a@T=0"]
  for r_ in res.values():
    assert r_["identical_outputs"] == r_["prompts"] == 2 and r_["spec_tokens"] <= 2 * 5
  assert (out / "acceptance.png").stat().st_size > 10_000 and "| set_b | 0 |" in (out / "results.md").read_text()


# ---- evaluate's picture -------------------------------------------------------------------------------------------

def _result(i, depth):
  hist = [5 + i, 3, 2, 1][:depth + 1] + [0] * max(0, depth - 3)
  return dict(tau=1.5 + 0.1 * i, n_alpha=[0.5] * depth, accept_hist=hist, vanilla_tok_per_s=40.0 + i,
              spec_tok_per_s=50.0 + 2 * i, speedup=(50.0 + 2 * i) / (40.0 + i), identical_outputs=2, prompts=2)


@pytest.mark.parametrize("sets,depth", [(1, 1), (12, 5)])
def test_acceptance_picture(tmp_path, sets, depth):
  """Rendered headless to a PNG; the speedups are written on the bars, tau is drawn, the accepted-length axis has
  integer ticks 0..D (no 0.96..1.04 axis for a depth-1 shape)."""
  from vsd_jax.eval.report import plot_results
  results = {f"set{i}@T=0": _result(i, depth) for i in range(sets)}
  path = tmp_path / "acceptance.png"
  fig = plot_results(results, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
  speed, tau_ax, hist_ax = fig.axes
  texts = [t.get_text() for t in speed.texts]
  assert texts == [f"{r['speedup']:.2f}x" for r in results.values()]
  assert [t.get_text() for t in tau_ax.texts] == [f"{r['tau']:.2f}" for r in results.values()]
  assert list(hist_ax.get_xticks()) == list(range(depth + 1))
  assert len(hist_ax.patches) == sets * (depth + 1) and len(speed.patches) == 2 * sets
  width, height = fig.get_size_inches()
  assert width >= 1.0 * sets and np.isfinite(height)

"""Bad input to the CLIs (train, convert_draft, generate's prompt file) and what must survive a failure: each
probe fails with one clear message naming the input and the fix, no traceback (--debug / VSD_JAX_DEBUG=1 shows
it), before anything heavy loads; finished work (a draft, the data stage) stays on disk. The error path itself:
vsd_jax/errors.py. Drafts written atomically and checked on load: tests/test_decoding_errors.py; the response
cache's torn last line: tests/test_data.py."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No hub model or dataset is ever fetched by these probes: a hub id fails fast against a closed port.
OFFLINE = dict(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")


def run_cli(args, env=None, timeout=300):
  e = {k: v for k, v in os.environ.items() if k != "VSD_JAX_DEBUG"}
  e.update(OFFLINE, **(env or {}))
  return subprocess.run([sys.executable, "-m"] + args, cwd=REPO, env=e, capture_output=True, text=True,
                        timeout=timeout)


def assert_user_error(r, *needles):
  """Exit status non-zero, `error: <one line>` naming every needle, no traceback."""
  assert r.returncode != 0, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], (needle, r.stderr[-3000:])


# ---- the one error path: run_app (absl CLIs) ----

def test_user_error_prints_one_message_and_debug_shows_the_traceback(tmp_path):
  args = ["vsd_jax.train", "--config", "configs/tiny.py", "--config.train.lr=-1e-3", f"--config.workdir={tmp_path}"]
  r = run_cli(args)
  assert_user_error(r, "train.lr=-0.001", "--config.train.lr=")
  assert r.stderr.strip().splitlines()[-2:][0].startswith("error: ")  # the message and the --debug hint, last
  r = run_cli(args + ["--debug"])
  assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError: config.train.lr=-0.001" in r.stderr, r.stderr
  from vsd_jax.errors import debug_requested
  assert debug_requested(["x", "--debug"]) and not debug_requested(["x"])
  os.environ["VSD_JAX_DEBUG"] = "1"
  try:
    assert debug_requested(["x"])
  finally:
    del os.environ["VSD_JAX_DEBUG"]


def reported(fn, *args, **kwargs) -> str:
  """The first line of what a CLI prints for fn's UserError (errors.run_reporting, the path every CLI takes)."""
  from vsd_jax.errors import run_reporting
  with pytest.raises(SystemExit) as e:
    run_reporting(fn, *args, debug=False, **kwargs)
  lines = str(e.value).splitlines()
  assert len(lines) == 2 and lines[0].startswith("error: ") and "--debug" in lines[1], lines
  return lines[0]


# ---- train: inputs checked before the target, the data stage or the mesh ----

@pytest.mark.parametrize("field,value,needles", [
    ("train.lr", -1e-3, ("train.lr=-0.001", "--config.train.lr=")),
    ("train.lr", float("nan"), ("train.lr=nan", "finite")),
    ("train.batch_size", 0, ("train.batch_size=0", ">= 1")),
    ("train.total_steps", 0, ("train.total_steps=0",)),
    ("data.sources.alpaca.path", "train/nope.json", ("nope.json", "config.data.sources")),
    ("eval.heldout_path", "eval/nope.jsonl", ("nope.jsonl",)),
    ("draft.init_from", "/nonexistent/draft", ("draft.init_from='/nonexistent/draft'", "vsd_jax.train")),
    ("model.name", "/nonexistent/model.gguf", ("/nonexistent/model.gguf",)),
    ("method", "beam", ("'beam'", "eagle3")),
    ("draft.objective", "lk", ("config.draft.objective='lk'", "lk_alpha")),
])
def test_train_checks_inputs_before_loading(tmp_path, field, value, needles):
  """train.check_inputs runs before the mesh, the target and the data stage (train.main's first step)."""
  from vsd_jax import train
  from vsd_jax.cli_config import load_config_file
  c = load_config_file(os.path.join(REPO, "configs", "tiny.py"))
  c.workdir = str(tmp_path / "w")
  *path, last = field.split(".")
  node = c
  for part in path:
    node = node[part]
  node[last] = value
  msg = reported(train.check_inputs, c)
  for needle in needles:
    assert needle in msg, msg


@pytest.mark.parametrize("args,needles", [
    (["--config", "configs/vicuna.py:30b"], ("configs/vicuna.py:30b", "unknown size", "13b")),
    (["--config", "configs/nope.py"], ("configs/nope.py", "not found")),
    (["--config", "configs/tiny.py", "--config.train.lrr=1"], ("train.lrr", "Known fields there")),
])
def test_config_file_and_override_errors(monkeypatch, args, needles):
  """Checked before absl parses the flags (whose own report of a failing get_config is a traceback)."""
  from vsd_jax.cli_config import check_overrides
  monkeypatch.chdir(REPO)
  msg = reported(check_overrides, ["prog"] + args)
  for needle in needles:
    assert needle in msg, msg


@pytest.mark.parametrize("devices", [1, 8])
def test_paper_config_gets_past_the_mesh_to_the_hub(tmp_path, devices):
  """configs/vicuna.py on this machine: the mesh is sized to the devices present (its v5p-32 layout is a preset),
  and the run stops only at the hub download (no network here), with one line naming the model."""
  env = dict(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", HF_HOME=str(tmp_path / "hf"))
  r = run_cli(["vsd_jax.train", "--config", "configs/vicuna.py", f"--config.workdir={tmp_path / 'w'}"], env=env)
  assert_user_error(r, "could not fetch 'lmsys/vicuna-7b-v1.3' from the Hugging Face hub")
  assert f"mesh: data 1 x fsdp {devices} x tensor 1 over {devices} cpu device(s)" in r.stderr, r.stderr[-3000:]
  assert "presets: v5p-32" in r.stderr


def test_batch_larger_than_the_dataset_names_both():
  from vsd_jax.data.dataset import full_batches
  from vsd_jax.errors import UserError
  assert full_batches(10, 4, "train.batch_size") == 2
  with pytest.raises(UserError, match=r"train.batch_size=16 is larger than the 10 training sequences.*at most 10"):
    full_batches(10, 16, "train.batch_size")


@pytest.mark.slow
def test_train_batch_larger_than_the_dataset_after_the_data_stage(tmp_path):
  """The tiny LLaVA's 8 training prompts, batch 9: a clear message after the data stage, whose responses stay
  cached for the rerun (no ZeroDivisionError, nothing regenerated)."""
  env = dict(VSD_JAX_CACHE=str(tmp_path / "cache"))
  args = ["vsd_jax.train", "--config", "configs/llava.py:tiny", f"--config.workdir={tmp_path / 'w'}",
          "--config.train.batch_size=9"]
  r = run_cli(args, env=env, timeout=900)
  assert_user_error(r, "train.batch_size=9 is larger than the 8 training sequences", "at most 8")
  cached = [f for f in os.listdir(tmp_path / "w" / "data_cache") if f.startswith("responses-")]
  assert len(cached) == 1
  with open(tmp_path / "w" / "data_cache" / cached[0]) as f:
    assert len(f.read().splitlines()) == 8  # the data stage's work is on disk for the rerun
  r = run_cli(args, env=env, timeout=900)
  assert_user_error(r, "train.batch_size=9")
  assert "8 cached" in r.stderr and "0 to generate" in r.stderr, r.stderr[-3000:]


# ---- prompt files ----

def test_non_utf8_prompt_file_names_the_file(tmp_path):
  p = tmp_path / "latin1.txt"
  p.write_bytes("first prompt\ncaf\u00e9 au lait\n".encode("latin-1"))
  r = run_cli(["vsd_jax.generate", "--config", "configs/tiny.py", "--prompts", str(p), "--output",
               str(tmp_path / "o.jsonl")])
  assert_user_error(r, str(p), "not UTF-8", "line 2")
  assert not (tmp_path / "o.jsonl").exists()


def test_non_utf8_training_source_names_the_file(tmp_path):
  from vsd_jax.data.sources import DataSourceError, read_file
  p = tmp_path / "prompts.jsonl"
  p.write_bytes('{"question": "ok"}\n{"question": "caf\u00e9"}\n'.encode("latin-1"))
  with pytest.raises(DataSourceError, match=rf"prompt file '{p}' is not UTF-8 text \(byte \d+, line 2"):
    read_file(str(p), "gsm8k")

def test_prompt_too_long_advises_only_what_helps():
  from vsd_jax.decoding.runner import PromptTooLongError, check_capacity
  with pytest.raises(PromptTooLongError, match="Shorten the prompt or lower --max_new_tokens"):
    check_capacity([100], 64, 128)  # 100 + 64 > 128, but 100 + 28 fits
  with pytest.raises(PromptTooLongError) as e:
    check_capacity([130], 8, 128)  # no number of new tokens fits a 130-token prompt in 128 positions
  assert "lower --max_new_tokens" not in str(e.value) and "model.max_positions" in str(e.value)
  with pytest.raises(PromptTooLongError) as e:
    check_capacity([100], 8, 128, extra=40)  # the draft's slots alone leave no room
  assert "lower --max_new_tokens" not in str(e.value)


def test_no_prompts_to_summarize():
  from vsd_jax.errors import UserError
  from vsd_jax.eval.metrics import summarize
  with pytest.raises(UserError, match=r"--num_prompts >= 1"):
    summarize([], [])


# ---- convert_draft: never overwrites without --overwrite; inputs checked before the target loads ----

def _fake_draft(directory):
  """What convert_draft's path checks look at (not a loadable draft: nothing may be loaded before they pass)."""
  os.makedirs(directory)
  for name, data in (("draft_config.json", b"{}"), ("draft.msgpack", b"weights")):
    with open(os.path.join(directory, name), "wb") as f:
      f.write(data)
  return str(directory)


@pytest.mark.parametrize("case", ["existing_draft", "output_is_file", "missing_input", "input_not_a_draft",
                                  "missing_target"])
def test_convert_draft_refuses(tmp_path, case):
  from vsd_jax import convert_draft
  src = _fake_draft(tmp_path / "src")
  out, target, to = tmp_path / "out", "smollm2-135m-instruct", "eagle3"
  args = {"--input": src, "--to": to, "--output": str(out)}
  if case == "existing_draft":
    _fake_draft(out)
    needles = (str(out), "a vsd_jax draft", "--overwrite")
  elif case == "output_is_file":
    out.write_text("x")
    needles = (str(out), "is a file")
  elif case == "missing_input":
    args["--input"] = str(tmp_path / "nope")
    needles = (str(tmp_path / "nope"), "not a directory")
  elif case == "input_not_a_draft":
    args.update({"--input": str(tmp_path), "--to": "vsd_jax", "--target": target})
    needles = (str(tmp_path), "no config.json", "EAGLE-3 checkpoint")
  else:
    args["--target"] = str(tmp_path / "missing.gguf")
    needles = ("missing.gguf",)
  before = {p: open(os.path.join(out, p), "rb").read() for p in os.listdir(out)} if out.is_dir() else None
  msg = reported(convert_draft.main, sum(args.items(), ()))
  for needle in needles:
    assert needle in msg, msg
  if before is not None:  # the existing draft is untouched
    assert {p: open(os.path.join(out, p), "rb").read() for p in os.listdir(out)} == before
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or ".replaced-" in p]


def test_convert_draft_cli_reports_without_traceback(tmp_path):
  out = tmp_path / "out"
  out.write_text("x")
  r = run_cli(["vsd_jax.convert_draft", "--input", _fake_draft(tmp_path / "src"), "--to", "eagle3", "--output",
               str(out)])
  assert_user_error(r, str(out), "is a file")


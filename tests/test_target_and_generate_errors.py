"""Bad input to loading a target (model files, names, hub ids) and to generate (prompt files, cache capacity, config
fields): each gets one clear error naming the input and the fix; generate's output has its documented fields."""

import os
import subprocess
import sys

import pytest

from vsd_jax.decoding.runner import PromptTooLongError, check_capacity, pad_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, env=None, timeout=300):
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m"] + args, cwd=REPO, env=e, capture_output=True, text=True,
                        timeout=timeout)


def test_missing_model_file(tmp_path):
  from vsd_jax.weights import load_target
  with pytest.raises(FileNotFoundError, match="model file not found.*nope.gguf"):
    load_target(str(tmp_path / "nope.gguf"))


def test_corrupt_gguf_file(tmp_path):
  from vsd_jax.weights.gguf_file import read_gguf
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    read_gguf(str(bad))


def test_unknown_model_name():
  from vsd_jax.weights import load_target
  with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
    load_target("no-such-model")


def test_hub_unreachable(tmp_path):
  """A hub id with no network: the real hub code path fails with a clear message, not a stack of retries."""
  code = ("from vsd_jax.weights import load_target, HubUnreachableError\n"
          "try:\n  load_target('someorg/some-llama')\nexcept HubUnreachableError as e:\n  print('CLEAR:', e)\n")
  env = dict(os.environ, HF_HOME=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2",
             HF_HUB_DOWNLOAD_TIMEOUT="2")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert "CLEAR: could not fetch 'someorg/some-llama' from the Hugging Face hub" in r.stdout, r.stderr[-2000:]


def test_prompt_longer_than_cache():
  with pytest.raises(PromptTooLongError, match="prompt 'q7' has 100 tokens.*needs 164 positions.*allows 128"):
    check_capacity([10, 100], 64, 128, names=["q1", "prompt 'q7'"])
  assert check_capacity([10, 100], 20, 128) == 128


def test_cache_slots_follow_the_padded_shape():
  """Prompts of 100 and 120 tokens pad to one shape [1, 128]; with 16 new tokens they need 116 and 136 slots.
  They get the same slots (one compiled program per shape, as run_batches assumes), enough for either."""
  (a, la), (b, lb) = pad_prompts([[1] * 100], 0), pad_prompts([[1] * 120], 0)
  assert a.shape == b.shape == (1, 128)
  assert check_capacity(la, 16, 8192) == check_capacity(lb, 16, 8192) == 256
  assert check_capacity([100], 20, 128) == 128  # padded 128 + 20 exceeds the model's 128: capped, still >= 120


@pytest.mark.slow
def test_prompt_too_long_in_cli(tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("hello there, " * 40 + "\n")
  r = _cli(["vsd_jax.generate", "--config", "configs/tiny.py", "--prompts", str(p), "--output",
            str(tmp_path / "o.jsonl"), "--max_new_tokens", "8", "--config.model.max_positions=64"])
  assert r.returncode != 0
  assert f"error: prompt 0 of {p}" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "lower --max_new_tokens" not in r.stderr  # the prompt alone overflows the 64 positions: it cannot help
  assert not (tmp_path / "o.jsonl").exists()


def test_empty_prompt_file(tmp_path):
  p = tmp_path / "empty.txt"
  p.write_text("\n\n")
  r = _cli(["vsd_jax.generate", "--config", "configs/tiny.py", "--prompts", str(p), "--output",
            str(tmp_path / "o.jsonl")])
  assert r.returncode != 0 and f"error: prompt file {str(p)!r} has no prompts" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    pad_prompts([[]], 0)


def test_unknown_config_field(tmp_path):
  r = _cli(["vsd_jax.generate", "--config", "configs/tiny.py", "--config.generate.max_new_tokenz=3",
            "--prompts", "x", "--output", "y"])
  assert r.returncode != 0
  assert "unknown config field 'generate.max_new_tokenz'" in r.stderr and "max_new_tokens" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_cli_writes_documented_fields(tmp_path, data_root):
  q = os.path.join(data_root, "eval", "eagle", "mt_bench", "question.jsonl")
  out = tmp_path / "o.jsonl"
  r = _cli(["vsd_jax.generate", "--config", "configs/tiny.py", "--prompts", q, "--limit", "2",
            "--max_new_tokens", "8", "--output", str(out)])
  assert r.returncode == 0, r.stderr[-2000:]
  import json
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r_["question_id"] for r_ in rows] == [81, 82]
  for row in rows:
    assert set(row) == {"question_id", "prompt_ids", "output_ids", "text", "new_tokens", "wall_time", "rounds"}
    assert row["new_tokens"] == len(row["output_ids"]) <= 8 and row["rounds"] == row["new_tokens"] - 1
    assert row["wall_time"] > 0
    assert row["prompt_ids"][-4:] == [1, 520, 9531, 198]  # chat template: "<|im_start|>assistant\n"

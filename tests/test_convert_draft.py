"""Drafts in and out of the EAGLE-3 checkpoint format (vsd_jax.convert_draft, weights/eagle3_format.py).

Round trips are exact; the exported checkpoint is checked against SpecForge's own PyTorch draft
(`specforge.modeling.draft.llama3_eagle.LlamaForCausalLMEagle3`, loaded through SpecForge's config reader and
model factory) on the same fused features and tokens, for TTT step 0 and later steps.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import init_draft_params, vocab_maps
from vsd_jax import convert_draft
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
from vsd_jax.weights.convert import config_from_hf_dict
from vsd_jax.weights.draft_io import load_draft, save_draft
from vsd_jax.weights.eagle3_format import Eagle3FormatError, export_eagle3, import_eagle3

V, N, H = 64, 40, 32
KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a PRNG key's shape: params are only shaped by the init, not drawn


def target_hf_config(num_layers=8, rope_scaling=None, hidden=H, vocab=V, **fields):
  """A tiny LLaMA target as an HF config.json dict (8 layers: fused layer inputs (2, 4, 5)); fields: other keys
  (e.g. a Qwen3 target's model_type, head_dim, rope_theta)."""
  return dict(dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=rope_scaling, max_position_embeddings=512),
              **fields)


# Targets of the SpecForge comparison: a LLaMA-3 (llama3 RoPE scaling), and a Qwen3 with its 151936-id vocabulary
# (the draft's 40 ids spread over it: d2t offsets up to ~151k) and head_dim 16 (q width 64 != hidden 32).
QWEN3_VOCAB = 151936
SPECFORGE_TARGETS = {
    "llama3": dict(vocab=V, draft_ids=list(range(5, 30)) + list(range(40, 55))),
    "qwen3": dict(vocab=QWEN3_VOCAB, draft_ids=list(range(5, 30)) + list(range(151000, 151015)),
                  model_type="qwen3", head_dim=16, rope_theta=1000000.0),
}


# llama3 RoPE with a short original context: the 8-dim head has one frequency in each band (kept,
# interpolated, divided), so a mistake in any branch shows in the SpecForge comparison.
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)


def random_params(cfg, seed=0):
  """Random draft parameters with the tree of `init_draft_params` (its shapes via eval_shape: no compile), every
  leaf perturbed so that a swapped or misplaced tensor (norms included) changes the logits."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(init_draft_params, cfg), KEY,
                          jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size), jnp.float32))
  return jax.tree_util.tree_map_with_path(
      lambda path, s: ((1.0 if path[-1].key == "scale" else 0.0) + 0.3 * rng.standard_normal(s.shape)).astype(
          s.dtype), shapes)


def make_draft(directory, rope_scaling=None, num_layers=8, vocab=V, draft_ids=None, **target_fields):
  """A random draft saved with `save_draft`, with a draft vocabulary that skips low ids (d2t non-zero)."""
  tcfg = config_from_hf_dict(target_hf_config(num_layers, rope_scaling, vocab=vocab, **target_fields))
  cfg = Eagle3Config.from_target(tcfg, draft_vocab_size=N)
  embed = np.random.default_rng(1).standard_normal((vocab, H)).astype(np.float32)
  params = random_params(cfg)
  d2t, t2d = vocab_maps(vocab, draft_ids or list(range(5, 30)) + list(range(40, 55)))
  save_draft(str(directory), cfg, params, d2t, t2d, tcfg)
  return tcfg, cfg, embed, params


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("convert")
  tcfg, cfg, embed, params = make_draft(root / "ours")
  export_eagle3(str(root / "ours"), str(root / "eagle3"))
  return dict(root=root, tcfg=tcfg, cfg=cfg, embed=embed, params=params)


def assert_same_draft(a, b):
  (cfg_a, p_a, d2t_a, t2d_a), (cfg_b, p_b, d2t_b, t2d_b) = a, b
  assert cfg_a == cfg_b
  assert jax.tree.structure(p_a) == jax.tree.structure(p_b)
  for x, y in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))  # bitwise
  for x, y in ((d2t_a, d2t_b), (t2d_a, t2d_b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def edit_config(src, dst, **changes):
  """Copy an EAGLE-3 checkpoint directory, changing config.json keys (None deletes a key)."""
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    config = json.load(f)
  for k, v in changes.items():
    if v is None:
      config.pop(k, None)
    else:
      config[k] = v
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return str(dst)


def test_export_writes_the_eagle3_format(exported):
  from safetensors.numpy import load_file

  e3 = exported["root"] / "eagle3"
  with open(e3 / "config.json") as f:
    config = json.load(f)
  assert config["architectures"] == ["LlamaForCausalLMEagle3"]
  assert (config["num_hidden_layers"], config["vocab_size"], config["draft_vocab_size"]) == (1, V, N)
  assert config["tie_word_embeddings"] is False and "target_hidden_size" not in config
  assert config["rope_scaling"] is None and config["torch_dtype"] == "float32"
  # The inputs of layers (2, L//2, L-3) of the 8-layer target: vLLM reads layer inputs, SGLang/SpecForge outputs.
  assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
  assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 3, 4], "use_aux_hidden_state": True}
  tensors = load_file(str(e3 / "model.safetensors"))
  assert "embed_tokens.weight" not in tensors
  assert tensors["fc.weight"].shape == (H, 3 * H)
  assert tensors["midlayer.self_attn.q_proj.weight"].shape == (4 * 8, 2 * H)
  assert tensors["lm_head.weight"].shape == (N, H)
  assert tensors["d2t"].dtype == np.int64 and tensors["t2d"].dtype == np.bool_
  ids = np.arange(N) + tensors["d2t"]
  np.testing.assert_array_equal(ids, np.flatnonzero(tensors["t2d"]))
  np.testing.assert_array_equal(ids[:3], [5, 6, 7])


def test_round_trip_is_exact(exported):
  root, tcfg = exported["root"], exported["tcfg"]
  import_eagle3(str(root / "eagle3"), str(root / "back"), tcfg)
  original = load_draft(str(root / "ours"), tcfg)
  assert_same_draft(original, load_draft(str(root / "back"), tcfg))
  # --config.draft.init_from needs the tree of a fresh init: the imported draft has it.
  fresh = jax.eval_shape(functools.partial(init_draft_params, original[0]), KEY, exported["embed"])
  assert jax.tree.structure(fresh) == jax.tree.structure(load_draft(str(root / "back"), tcfg)[1])
  # Export of the imported draft is the same checkpoint, byte for byte.
  export_eagle3(str(root / "back"), str(root / "eagle3_again"))
  for name in ("config.json", "model.safetensors"):
    assert (root / "eagle3" / name).read_bytes() == (root / "eagle3_again" / name).read_bytes()


def test_round_trip_bfloat16_and_cli(exported, tmp_path):
  tcfg, cfg, params = exported["tcfg"], exported["cfg"], exported["params"]
  bf = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  d2t, t2d = load_draft(str(exported["root"] / "ours"))[2:]
  save_draft(str(tmp_path / "bf16"), bf, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), d2t, t2d, tcfg)
  target_dir = tmp_path / "target"  # a target given as an HF directory: only config.json is read
  target_dir.mkdir()
  (target_dir / "config.json").write_text(json.dumps(target_hf_config()))
  assert convert_draft.main(["--input", str(tmp_path / "bf16"), "--to", "eagle3", "--output",
                             str(tmp_path / "e3"), "--target", str(target_dir)]) == 0
  assert json.loads((tmp_path / "e3" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert convert_draft.main(["--input", str(tmp_path / "e3"), "--to", "vsd_jax", "--target", str(target_dir),
                             "--output", str(tmp_path / "back")]) == 0
  assert_same_draft(load_draft(str(tmp_path / "bf16"), tcfg), load_draft(str(tmp_path / "back"), tcfg))
  with pytest.raises(SystemExit, match="needs --target"):
    convert_draft.main(["--input", str(tmp_path / "e3"), "--to", "vsd_jax", "--output", str(tmp_path / "x")])


def test_overwrite_replaces_the_whole_output(exported, tmp_path):
  """An existing output is replaced only with --overwrite, and then as a whole: no old file stays beside the new
  ones (refusals without it: tests/test_cli_errors.py)."""
  out = tmp_path / "e3"
  out.mkdir()
  (out / "pytorch_model.bin").write_bytes(b"an older checkpoint")
  args = ["--input", str(exported["root"] / "ours"), "--to", "eagle3", "--output", str(out)]
  with pytest.raises(SystemExit, match="already holds 1 file"):
    convert_draft.main(args)
  assert (out / "pytorch_model.bin").read_bytes() == b"an older checkpoint"
  assert convert_draft.main(args + ["--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["e3"]  # no temporary or replaced directory left
  nested = tmp_path / "new" / "folders" / "e3"  # missing folders above the output are created
  assert convert_draft.main(args[:-1] + [str(nested)]) == 0 and (nested / "config.json").is_file()


def test_import_pytorch_bin_without_vocab_maps(exported, tmp_path):
  """EAGLE's own checkpoints: pytorch_model.bin; a draft over the full vocabulary may omit d2t/t2d."""
  torch = pytest.importorskip("torch")
  from safetensors.numpy import load_file

  tensors = load_file(str(exported["root"] / "eagle3" / "model.safetensors"))
  full = {k: torch.from_numpy(v.copy()) for k, v in tensors.items() if k not in ("d2t", "t2d")}
  full["lm_head.weight"] = torch.randn(V, H)
  full["embed_tokens.weight"] = torch.randn(V, H)  # carried by some checkpoints; ignored (target's is used)
  src = edit_config(exported["root"] / "eagle3", tmp_path / "bin", draft_vocab_size=V)
  os.remove(os.path.join(src, "model.safetensors"))
  torch.save(full, os.path.join(src, "pytorch_model.bin"))
  import_eagle3(src, str(tmp_path / "out"), exported["tcfg"])
  cfg, params, d2t, t2d = load_draft(str(tmp_path / "out"), exported["tcfg"])
  assert cfg.draft_vocab_size == V and d2t.dtype == np.int32 and not d2t.any() and t2d.all()
  np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), full["lm_head.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(params["fc"]["kernel"]), tensors["fc.weight"].T)


@pytest.mark.parametrize("target", sorted(SPECFORGE_TARGETS))
def test_logits_match_specforge(tmp_path, monkeypatch, target):
  """SpecForge's LlamaForCausalLMEagle3 on the exported checkpoint = our Eagle3Draft, TTT steps 0, 1, 2, for a
  LLaMA-3 target and a Qwen3 one (`SPECFORGE_TARGETS`).

  SpecForge's TTT (OnlineEagle3Model.forward, sdpa backend): step 0 runs the draft over the sequence with
  fc(features) and the tokens shifted left by one; step k feeds the previous step's output hidden state, the
  tokens shifted k more, RoPE positions + k, and attends to step 0's causal keys plus its own row's keys of
  steps 1..k (cache_hidden). That loop is driven here through the draft's own methods (its training wrapper
  needs CUDA/triton for the loss); ours is the training unroll `ttt_unroll`.
  """
  torch = pytest.importorskip("torch")
  pytest.importorskip("specforge.modeling.draft.llama3_eagle")
  from safetensors.torch import load_file, save_file
  from specforge.modeling.auto import AutoDraftModel, AutoDraftModelConfig
  from specforge.utils import padding

  from vsd_jax.methods.eagle3.loss import ttt_unroll

  monkeypatch.setattr(torch._dynamo.config, "disable", True)  # SpecForge's @torch.compile: eager on CPU
  fields = dict(SPECFORGE_TARGETS[target])
  vocab = fields["vocab"]
  tcfg, cfg, embed, params = make_draft(tmp_path / "ours", rope_scaling=LLAMA3 if target == "llama3" else None,
                                        **fields)
  assert cfg.rope_scaling_type == ("llama3" if target == "llama3" else None) and cfg.vocab_size == vocab
  assert tcfg.qk_norm == (target == "qwen3") and cfg.num_heads * cfg.head_dim == (64 if target == "qwen3" else 32)
  export_eagle3(str(tmp_path / "ours"), str(tmp_path / "e3"))
  b, t, steps = 2, 9, 3
  rng = np.random.default_rng(7)
  feats = rng.standard_normal((b, t, 3 * H)).astype(np.float32)
  ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
  unroll = jax.jit(lambda p, e, f, i: ttt_unroll(p, Eagle3Draft(cfg), e, f, i, num_steps=steps))
  ours = np.asarray(unroll(params, embed, feats, ids))  # [K, B, T, N]

  # SpecForge's checkpoint path (export.checkpoint_io.materialize_draft, in float32): config reader, model
  # factory, state dict; only the embedding may be missing. Its load_embedding reads the target's.
  sf_cfg = AutoDraftModelConfig.from_file(str(tmp_path / "e3" / "config.json"))
  model = AutoDraftModel.from_config(sf_cfg, torch_dtype=torch.float32)
  assert type(model).__name__ == "LlamaForCausalLMEagle3"
  missing, unexpected = model.load_state_dict(load_file(str(tmp_path / "e3" / "model.safetensors")), strict=False)
  assert list(missing) == ["embed_tokens.weight"] and not unexpected
  (tmp_path / "target").mkdir()
  save_file({"model.embed_tokens.weight": torch.from_numpy(np.array(embed))},
            str(tmp_path / "target" / "model.safetensors"))
  model.load_embedding(str(tmp_path / "target"))
  model.eval()
  with torch.no_grad():
    hidden = model.project_hidden_states(torch.from_numpy(np.array(feats)))
    positions = torch.arange(t)[None]
    mask = model.prepare_decoder_attention_mask(torch.ones(b, t, dtype=torch.bool), hidden, b, t, 0)
    cache_hidden = [[], []]
    tokens = padding(torch.from_numpy(np.array(ids)).long(), left=False)
    theirs = []
    for _ in range(steps):
      hidden = model.backbone(input_embeds=model.embed_input_ids(tokens).to(hidden.dtype), hidden_states=hidden,
                              cache_hidden=cache_hidden, attention_mask=mask, position_ids=positions)
      theirs.append(model.compute_logits(hidden).numpy())
      tokens = padding(tokens, left=False)
  for k in range(steps):
    rows = t - 1 - k  # rows whose step-k token exists (SpecForge pads past the end with token 0)
    np.testing.assert_allclose(theirs[k][:, :rows], ours[k][:, :rows], atol=1e-4, rtol=0, err_msg=f"step {k}")
  d2t = load_draft(str(tmp_path / "ours"))[2]
  np.testing.assert_array_equal(model.d2t.numpy(), d2t)


# ----------------------------------------------------------------------------------------------- errors


def test_draft_for_another_target(exported, tmp_path):
  e3 = str(exported["root"] / "eagle3")
  for change, pattern in ((dict(hidden=48), "hidden size: draft 32 vs target 48"),
                          (dict(vocab=80), "vocabulary size: draft 64 vs target 80"),
                          (dict(num_layers=12), "layers: draft 8 vs target 12")):
    other = config_from_hf_dict(target_hf_config(**change))
    with pytest.raises(Eagle3FormatError, match=pattern) as e:
      import_eagle3(e3, str(tmp_path / "out"), other)
    assert e3 in str(e.value) and "--target" in str(e.value)
  assert not (tmp_path / "out").exists()
  # --to eagle3 --target checks our draft against the target too.
  (tmp_path / "wide").mkdir()
  (tmp_path / "wide" / "config.json").write_text(json.dumps(target_hf_config(hidden=48)))
  with pytest.raises(SystemExit, match="trained for another target"):
    convert_draft.main(["--input", str(exported["root"] / "ours"), "--to", "eagle3", "--target",
                        str(tmp_path / "wide"), "--output", str(tmp_path / "x")])


def test_layer_id_conventions(exported, tmp_path):
  e3, tcfg = exported["root"] / "eagle3", exported["tcfg"]
  # Third-party checkpoints that name no layers get the engines' default, which is ours.
  plain = edit_config(e3, tmp_path / "plain", eagle_aux_hidden_state_layer_ids=None, eagle_config=None, vsd_jax=None)
  import_eagle3(plain, str(tmp_path / "out_plain"), tcfg)
  # SpecForge/SGLang ids alone (layer outputs 1, L//2-1, L-4) and vLLM ids alone (layer inputs) both import.
  sglang = edit_config(e3, tmp_path / "sglang", eagle_aux_hidden_state_layer_ids=None)
  import_eagle3(sglang, str(tmp_path / "out_sglang"), tcfg)
  vllm = edit_config(e3, tmp_path / "vllm", eagle_config=None)
  import_eagle3(vllm, str(tmp_path / "out_vllm"), tcfg)
  # The SGLang ids written at vLLM's key mean other layers: the error names both conventions and the fix.
  wrong = edit_config(e3, tmp_path / "wrong", eagle_aux_hidden_state_layer_ids=[1, 3, 4], eagle_config=None)
  with pytest.raises(Eagle3FormatError, match=r"inputs of target layers \[1, 3, 4\].*other convention"):
    import_eagle3(wrong, str(tmp_path / "out_wrong"), tcfg)
  both = edit_config(e3, tmp_path / "both", eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 4, 5]})
  with pytest.raises(Eagle3FormatError, match="two different sets of fused target layers"):
    import_eagle3(both, str(tmp_path / "out_both"), tcfg)
  # A draft of a 4-layer target fuses layers (2, 2, 1): no engine can feed it, so export refuses.
  make_draft(tmp_path / "small", num_layers=4)
  with pytest.raises(Eagle3FormatError, match=r"\[2, 2, 1\].*no engine"):
    export_eagle3(str(tmp_path / "small"), str(tmp_path / "small_e3"))


def test_bad_checkpoints(exported, tmp_path):
  e3, tcfg = exported["root"] / "eagle3", exported["tcfg"]
  cases = [
      (dict(draft_vocab_size=50), r"draft_vocab_size=50 but lm_head.weight has 40 rows; fix draft_vocab_size"),
      (dict(fc_norm=True), "fc_norm"),
      (dict(num_hidden_layers=2), "num_hidden_layers=2"),
      (dict(architectures=["Qwen3ForCausalLM"]), "not an EAGLE-3 LLaMA draft"),
      (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling 'yarn'"),
      (dict(intermediate_size=128), r"gate_proj.weight has shape \[64, 32\], expected \[128, 32\]"),
  ]
  for i, (change, pattern) in enumerate(cases):
    with pytest.raises(Eagle3FormatError, match=pattern):
      import_eagle3(edit_config(e3, tmp_path / f"c{i}", **change), str(tmp_path / f"o{i}"), tcfg)
  # No vocabulary maps while the draft vocabulary is smaller than the target's.
  from safetensors.numpy import load_file, save_file
  src = edit_config(e3, tmp_path / "nomaps")
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file({k: v for k, v in tensors.items() if k not in ("d2t", "t2d")}, os.path.join(src, "model.safetensors"))
  with pytest.raises(Eagle3FormatError, match="no d2t/t2d vocabulary maps"):
    import_eagle3(src, str(tmp_path / "o_nomaps"), tcfg)
  # Unsorted draft vocabulary (our maps need increasing target ids).
  d2t = tensors["d2t"].copy()
  d2t[[0, 1]] = d2t[1] + 1, d2t[0] - 1  # swap the target ids of draft ids 0 and 1
  save_file({**tensors, "d2t": d2t}, os.path.join(src, "model.safetensors"))
  with pytest.raises(Eagle3FormatError, match="increasing order"):
    import_eagle3(src, str(tmp_path / "o_unsorted"), tcfg)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    import_eagle3(str(tmp_path), str(tmp_path / "o_none"), tcfg)
  with pytest.raises(SystemExit, match="is the input directory"):
    convert_draft.main(["--input", str(e3), "--to", "vsd_jax", "--target", str(e3), "--output", str(e3)])


def test_qwen3_draft_for_another_vocabulary(tmp_path):
  """A Qwen3-target draft (151936 ids) imported for a Qwen2.5-7B-shaped target (152064 ids) names both sizes."""
  fields = dict(SPECFORGE_TARGETS["qwen3"])
  make_draft(tmp_path / "ours", **fields)
  export_eagle3(str(tmp_path / "ours"), str(tmp_path / "e3"))
  other = config_from_hf_dict(target_hf_config(vocab=152064, model_type="qwen2"))
  with pytest.raises(Eagle3FormatError, match="vocabulary size: draft 151936 vs target 152064"):
    import_eagle3(str(tmp_path / "e3"), str(tmp_path / "out"), other)

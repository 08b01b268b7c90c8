"""EAGLE-3 draft checkpoints as SGLang, vLLM and SpecForge load them: export our drafts, import theirs.

A checkpoint directory holds `config.json` and `model.safetensors` (import also reads `pytorch_model*.bin`
and sharded safetensors). The config is a one-layer LLaMA:

    architectures ["LlamaForCausalLMEagle3"], model_type "llama", num_hidden_layers 1, hidden_act "silu",
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
    rope_theta, rope_scaling (null or llama3), max_position_embeddings, vocab_size (the target's),
    draft_vocab_size, tie_word_embeddings false, torch_dtype, target_hidden_size (only when it differs
    from hidden_size, which our drafts never do).

Tensors (torch layout: linear weights are [out, in], our kernels [in, out] transposed):

    fc.weight                                  [H, 3*H_target]  fused target features -> H
    midlayer.input_layernorm.weight            [H]   normalises the token embedding
    midlayer.hidden_norm.weight                [H]   normalises the hidden state (fc output / own output)
    midlayer.self_attn.{q,k,v}_proj.weight     [heads*D, 2H]  input concat(embedding, hidden), in that order
    midlayer.self_attn.o_proj.weight           [H, heads*D]
    midlayer.post_attention_layernorm.weight   [H]
    midlayer.mlp.{gate,up}_proj.weight         [I, H];  midlayer.mlp.down_proj.weight [H, I]
    norm.weight                                [H]   final norm before lm_head
    lm_head.weight                             [N, H] over the draft vocabulary
    d2t                                        int64 [N]: target id = draft id + d2t[draft id]
    t2d                                        bool [V]: target id is in the draft vocabulary

No `embed_tokens.weight`: the draft uses the target's embedding (the engines share it from the target).
Checkpoints that carry one are imported without it (a warning says so).

Which target features. Our `fc` reads the *inputs* of target layers (2, L//2, L-3), concatenated in that
order (`LlamaConfig.eagle3_layers`, `vsd_jax.models.features`): EAGLE's own choice (eagle/model/
modeling_llama_kv.py keeps the hidden state entering those layers) and every engine's default when a draft
names no layers. The same hidden states are the *outputs* of layers (1, L//2-1, L-4) (SpecForge's default,
algorithms/model_providers.py), and the engines disagree on what a layer id in a config means:
  - vLLM reads the top-level `eagle_aux_hidden_state_layer_ids` as the layers whose *input* it captures
    (model_executor/models/llama.py captures before layer idx; v1/worker/gpu_model_runner.py reads the key);
  - SGLang (and SpecForge, which captures through SGLang) reads `eagle_config.eagle_aux_hidden_state_layer_ids`
    as the layers whose *output* it captures (srt/models/llama.py `set_eagle3_layers_to_capture` adds 1), and
    ignores the top-level key.
Export writes both, each in its reader's convention, plus `eagle_config.use_aux_hidden_state` true (SGLang
0.5.14's draft-width helper takes it as false when eagle_config lacks it). Import reads whichever is present
with the same conventions, requires them to agree, and checks the result against the target's (2, L//2, L-3):
a draft trained on other layers cannot be represented here and gets an error saying so.

The layer itself (concat order [embedding, hidden], which norm reads what, residual on the hidden state,
final norm before lm_head, d2t offsets) follows SpecForge's modeling/draft/llama3_eagle.py, SGLang's
srt/models/llama_eagle3.py and vLLM's model_executor/models/llama_eagle3.py, which agree.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Optional

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from vsd_jax.errors import InputNotFoundError, UserError
from vsd_jax.models.eagle3 import Eagle3Config
from vsd_jax.models.llama import LlamaConfig
from vsd_jax.weights.draft_io import load_draft, save_draft
from vsd_jax.weights.hf import read_config_json
# torch is imported only to read PyTorch .bin files: it is a test-only dependency (setup.py's test extra).

log = logging.getLogger(__name__)

ARCHITECTURE = "LlamaForCausalLMEagle3"
# Architecture names the same one-layer draft is published under: SpecForge/SGLang/EAGLE releases, vLLM's
# internal name, and EAGLE's training config (a plain LlamaForCausalLM with num_hidden_layers 1).
_ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaForCausalLM")

# (checkpoint tensor name, our parameter path, linear weight: transpose [out, in] <-> kernel [in, out])
TENSOR_TABLE = (
    ("fc.weight", ("fc", "kernel"), True),
    ("midlayer.input_layernorm.weight", ("midlayer", "input_layernorm", "scale"), False),
    ("midlayer.hidden_norm.weight", ("midlayer", "hidden_norm", "scale"), False),
    ("midlayer.self_attn.q_proj.weight", ("midlayer", "self_attn", "q_proj", "kernel"), True),
    ("midlayer.self_attn.k_proj.weight", ("midlayer", "self_attn", "k_proj", "kernel"), True),
    ("midlayer.self_attn.v_proj.weight", ("midlayer", "self_attn", "v_proj", "kernel"), True),
    ("midlayer.self_attn.o_proj.weight", ("midlayer", "self_attn", "o_proj", "kernel"), True),
    ("midlayer.post_attention_layernorm.weight", ("midlayer", "post_attention_layernorm", "scale"), False),
    ("midlayer.mlp.gate_proj.weight", ("midlayer", "mlp", "gate_proj", "kernel"), True),
    ("midlayer.mlp.up_proj.weight", ("midlayer", "mlp", "up_proj", "kernel"), True),
    ("midlayer.mlp.down_proj.weight", ("midlayer", "mlp", "down_proj", "kernel"), True),
    ("norm.weight", ("norm", "scale"), False),
    ("lm_head.weight", ("lm_head", "kernel"), True),
)
_IGNORED = ("embed_tokens.weight", "model.embed_tokens.weight")
_DTYPES = ("float32", "bfloat16", "float16")


class Eagle3FormatError(UserError):
  """An EAGLE-3 checkpoint (or one of our drafts) that cannot be converted; the message names the fix."""


# ---------------------------------------------------------------------------------------------- layers


def sglang_layer_ids(layer_inputs) -> list:
  """Layers whose *inputs* we fuse -> SGLang/SpecForge `eagle_config` ids (layers whose outputs they are)."""
  return [int(i) - 1 for i in layer_inputs]


def fused_layer_inputs(config: dict, where: str) -> Optional[tuple]:
  """The target layers whose inputs a checkpoint's config says its draft fuses; None if it names none.

  Reads the top-level `eagle_aux_hidden_state_layer_ids` as vLLM does (layer inputs; or outputs when
  `eagle_aux_layer_semantics` is "sglang") and `eagle_config.eagle_aux_hidden_state_layer_ids` as SGLang and
  SpecForge do (layer outputs), and requires the two to agree.
  """
  readings = {}
  top = config.get("eagle_aux_hidden_state_layer_ids")
  if top:
    shift = 1 if config.get("eagle_aux_layer_semantics") == "sglang" else 0
    readings["eagle_aux_hidden_state_layer_ids (vLLM: layer inputs)"] = tuple(int(i) + shift for i in top)
  nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
  if nested:
    readings["eagle_config.eagle_aux_hidden_state_layer_ids (SGLang/SpecForge: layer outputs)"] = tuple(
        int(i) + 1 for i in nested)
  if len(set(readings.values())) > 1:
    detail = "; ".join(f"{k} -> inputs of layers {list(v)}" for k, v in readings.items())
    raise Eagle3FormatError(f"{where}: the config names two different sets of fused target layers ({detail}). "
                            "Keep the key whose convention matches how the draft was trained and delete the other.")
  return next(iter(readings.values()), None)


def _check_layers(layer_inputs: tuple, target_cfg: LlamaConfig, where: str) -> None:
  want = tuple(target_cfg.eagle3_layers)
  if tuple(layer_inputs) == want:
    return
  raise Eagle3FormatError(
      f"{where}: the draft fuses the inputs of target layers {list(layer_inputs)}, but vsd_jax fuses the inputs "
      f"of layers {list(want)} of this {target_cfg.num_layers}-layer target (vLLM ids {list(want)}, SGLang/SpecForge "
      f"eagle_config ids {sglang_layer_ids(want)}). If the draft was in fact trained on layers {list(want)}, its "
      "config writes the ids in the other convention: a top-level eagle_aux_hidden_state_layer_ids is read as "
      "layer inputs (vLLM), eagle_config.eagle_aux_hidden_state_layer_ids as layer outputs (SGLang, SpecForge); "
      "move the ids to the matching key. If it was trained on other layers (or for another target), vsd_jax "
      "cannot run it: import a draft made for this target, or train one with `python -m vsd_jax.train`.")


# ---------------------------------------------------------------------------------------------- vocab


def _check_vocab_maps(d2t: np.ndarray, t2d: np.ndarray, vocab_size: int, draft_vocab_size: int, where: str):
  if d2t.shape != (draft_vocab_size,):
    raise Eagle3FormatError(f"{where}: d2t has shape {list(d2t.shape)} but the draft vocabulary (lm_head rows) has "
                            f"{draft_vocab_size} tokens; d2t must hold one offset per draft token.")
  if t2d.shape != (vocab_size,):
    raise Eagle3FormatError(f"{where}: t2d has shape {list(t2d.shape)} but the target vocabulary has {vocab_size} "
                            "tokens; the draft was built for another target.")
  ids = np.arange(draft_vocab_size, dtype=np.int64) + d2t.astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise Eagle3FormatError(f"{where}: d2t maps draft ids outside the target vocabulary [0, {vocab_size}); the draft "
                            "was built for another target.")
  if np.any(np.diff(ids) <= 0):
    raise Eagle3FormatError(f"{where}: d2t does not list its target ids in increasing order; vsd_jax's draft "
                            "vocabulary maps require sorted ids (rebuild d2t/t2d from the sorted token list).")
  if not np.array_equal(np.flatnonzero(t2d), ids):
    raise Eagle3FormatError(f"{where}: t2d ({int(t2d.sum())} tokens) and d2t ({draft_vocab_size} tokens) describe "
                            "different draft vocabularies; rebuild both from the same token list.")


# ---------------------------------------------------------------------------------------------- export


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _leaf_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaf_paths(v, prefix + (k,))
  else:
    yield prefix


def _rope_fields(cfg: Eagle3Config) -> dict:
  if cfg.rope_scaling_type is None:
    return dict(rope_theta=cfg.rope_theta, rope_scaling=None)
  if cfg.rope_scaling_type != "llama3":
    raise Eagle3FormatError(f"rope_scaling_type={cfg.rope_scaling_type!r} has no EAGLE-3 config form")
  return dict(rope_theta=cfg.rope_theta, rope_scaling=dict(
      rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_position))


def eagle3_config(cfg: Eagle3Config, target_num_layers: int, layer_inputs) -> dict:
  """The config.json dict of a draft `cfg` that fuses the inputs of target layers `layer_inputs`."""
  layer_inputs = [int(i) for i in layer_inputs]
  return dict(
      architectures=[ARCHITECTURE], model_type="llama", hidden_act="silu",
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=1,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps, **_rope_fields(cfg), max_position_embeddings=cfg.max_position_embeddings,
      vocab_size=cfg.vocab_size, draft_vocab_size=cfg.draft_vocab_size, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, torch_dtype=cfg.param_dtype,
      # vLLM: ids of the layers whose input is captured. SGLang/SpecForge: ids of the layers whose output is.
      eagle_aux_hidden_state_layer_ids=layer_inputs,
      eagle_config=dict(eagle_aux_hidden_state_layer_ids=sglang_layer_ids(layer_inputs), use_aux_hidden_state=True),
      vsd_jax=dict(fused_target_layer_inputs=layer_inputs, target_num_hidden_layers=int(target_num_layers),
                   compute_dtype=cfg.dtype))


def export_eagle3(draft_dir: str, output_dir: str) -> str:
  """Write the draft in `draft_dir` (`draft_io.save_draft`'s layout) as an EAGLE-3 checkpoint directory.

  Returns output_dir, holding config.json and model.safetensors (tensors in the draft's parameter dtype).
  """
  cfg, params, d2t, t2d = load_draft(draft_dir)
  with open(os.path.join(draft_dir, "draft_config.json")) as f:
    target = json.load(f)["target"]
  where = f"draft {draft_dir!r}"
  if cfg.vision_adaptor or "vision_adaptor" in params:
    raise Eagle3FormatError(
        f"{where} has a vision adaptor (trained with draft.vision_adaptor=True: {cfg.vision_queries} learned queries "
        "over the image positions, fused into every text row). The EAGLE-3 format of SGLang, vLLM and SpecForge has "
        "no place for it, and an engine would run the draft without it, which is not the draft that was trained. "
        "Decode it with vsd_jax (generate / evaluate --draft), or train with --config.draft.vision_adaptor=False "
        "to export.")
  if (target["hidden_size"], target["vocab_size"]) != (cfg.hidden_size, cfg.vocab_size):
    raise Eagle3FormatError(f"{where}: its draft_config.json records a target of hidden size {target['hidden_size']} "
                            f"and vocabulary {target['vocab_size']}, the draft has {cfg.hidden_size} and "
                            f"{cfg.vocab_size}; the directory is inconsistent, re-save it with `save_draft`.")
  layers = tuple(int(i) for i in cfg.target_layers)
  if len(layers) != 3 or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1:
    raise Eagle3FormatError(
        f"{where}: it fuses the inputs of target layers {list(layers)}; SGLang and vLLM capture three distinct "
        "layers >= 1 in increasing order, so no engine can feed this draft (its target has "
        f"{target['num_layers']} layers; (2, L//2, L-3) needs L >= 7). Export drafts of larger targets only.")
  want = {path for _, path, _ in TENSOR_TABLE}
  have = set(_leaf_paths(params))
  if have != want:
    raise Eagle3FormatError(f"{where}: its parameters are not an Eagle3Draft's (missing "
                            f"{sorted('/'.join(p) for p in want - have)}, unexpected "
                            f"{sorted('/'.join(p) for p in have - want)}); pass a directory written by vsd_jax.train.")
  d2t, t2d = np.asarray(d2t), np.asarray(t2d).astype(bool)
  _check_vocab_maps(d2t, t2d, cfg.vocab_size, cfg.draft_vocab_size, where)

  tensors = {}
  for name, path, transpose in TENSOR_TABLE:
    w = np.asarray(_get(params, path))
    tensors[name] = np.ascontiguousarray(w.T if transpose else w)
  tensors["d2t"] = d2t.astype(np.int64)
  tensors["t2d"] = t2d
  os.makedirs(output_dir, exist_ok=True)
  save_file(tensors, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(eagle3_config(cfg, target["num_layers"], layers), f, indent=2)
  return output_dir


# ---------------------------------------------------------------------------------------------- import


def _read_tensors(directory: str) -> dict:
  """name -> numpy array of every tensor in the directory's safetensors files, else its PyTorch .bin files."""
  st = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if st:
    out = {}
    for path in st:
      with safe_open(path, framework="numpy") as f:
        for k in f.keys():
          out[k] = f.get_tensor(k)
    return out
  bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
  if not bins:
    raise InputNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory!r}; pass an EAGLE-3 draft "
                             "directory (config.json + weights).")
  try:
    import torch
  except ImportError as e:
    raise UserError(f"{directory!r} holds PyTorch .bin weights; install torch to read them "
                    "(`pip install torch`), or convert them to safetensors first.") from e
  out = {}
  for path in bins:
    for k, v in torch.load(path, map_location="cpu", weights_only=True).items():
      if v.dtype == torch.bfloat16:  # numpy has no bfloat16: widen (exact) and narrow back
        out[k] = v.float().numpy().astype(ml_dtypes.bfloat16)
      else:
        out[k] = v.numpy()
  return out


def _rope_config(config: dict, where: str) -> dict:
  params = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or params
  theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
  kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
  if kind in (None, "default"):
    return dict(rope_theta=float(theta), rope_scaling_type=None)
  if kind == "llama3":
    return dict(rope_theta=float(theta), rope_scaling_type="llama3", rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_position=int(scaling["original_max_position_embeddings"]))
  raise Eagle3FormatError(f"{where}: RoPE scaling {kind!r} is not supported (supported: default, llama3).")


def _check_supported(config: dict, where: str) -> None:
  """Variants of the EAGLE-3 layer that our Eagle3Draft does not compute: refuse rather than run them wrong."""
  arch = (config.get("architectures") or [None])[0]
  if arch not in _ARCHITECTURES:
    raise Eagle3FormatError(f"{where}: architecture {arch!r} is not an EAGLE-3 LLaMA draft (expected "
                            f"{ARCHITECTURE!r}); pass the draft's directory, not another model's.")
  if config.get("num_hidden_layers", 1) != 1:
    what = "a full model, not an EAGLE-3 draft" if arch == "LlamaForCausalLM" else "a multi-layer EAGLE-3 draft"
    raise Eagle3FormatError(f"{where}: num_hidden_layers={config.get('num_hidden_layers')} ({what}); vsd_jax "
                            "drafts have exactly one decoder layer.")
  if config.get("hidden_act", "silu") != "silu":
    raise Eagle3FormatError(f"{where}: hidden_act={config['hidden_act']!r}; vsd_jax drafts use silu.")
  eagle = config.get("eagle_config") or {}
  unsupported = {
      "eagle_config.use_aux_hidden_state=false (an EAGLE-1/2 style draft)": eagle.get("use_aux_hidden_state", True)
      is False,
      "fc_norm (per-layer norms of the fused features)": bool(config.get("fc_norm") or config.get("use_aux_norm")),
      "norm_before_fc": bool(config.get("norm_before_fc") or eagle.get("norm_before_fc")),
      "norm_before_residual (vLLM)": bool(config.get("norm_before_residual")),
      "norm_output=false (SpecForge)": config.get("norm_output", True) is False,
      "attention_bias": bool(config.get("attention_bias")), "mlp_bias": bool(config.get("mlp_bias")),
      f"logit_scale={config.get('logit_scale')}": config.get("logit_scale", 1.0) != 1.0,
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise Eagle3FormatError(f"{where}: the draft uses {', '.join(bad)}, which vsd_jax's Eagle3Draft does not "
                            "compute; only the standard EAGLE-3 layer converts.")


def _float_dtype(tensors: dict, where: str) -> str:
  names = {str(tensors[n].dtype) for n, _, _ in TENSOR_TABLE}
  bad = names - set(_DTYPES)
  if bad:
    raise Eagle3FormatError(f"{where}: weights of dtype {sorted(bad)}; vsd_jax reads {list(_DTYPES)} "
                            "(dequantize quantized checkpoints first).")
  return names.pop() if len(names) == 1 else "float32"  # mixed: widen all to float32 (exact)


def import_eagle3(src_dir: str, output_dir: str, target_cfg: LlamaConfig) -> str:
  """Convert the EAGLE-3 checkpoint in `src_dir` into our draft directory `output_dir` for `target_cfg`.

  The written directory loads with `draft_io.load_draft` (decode with --draft, continue training with
  --config.draft.init_from). Parameters keep the checkpoint's dtype. Raises Eagle3FormatError (or
  FileNotFoundError) naming the mismatch and the fix. Returns output_dir.
  """
  where = f"EAGLE-3 checkpoint {src_dir!r}"
  config = read_config_json(src_dir, where, "pass an EAGLE-3 draft directory (config.json + model.safetensors or "
                            "pytorch_model.bin).")
  _check_supported(config, where)
  absent = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in config]
  if absent:
    raise Eagle3FormatError(f"{where}: config.json lacks {absent}; it does not describe an EAGLE-3 draft.")

  hidden = int(config["hidden_size"])
  target_hidden = int(config.get("target_hidden_size") or hidden)
  vocab = int(config["vocab_size"])
  mismatch = [f"{k}: draft {a} vs target {b}" for k, a, b in (
      ("hidden size", target_hidden, target_cfg.hidden_size), ("vocabulary size", vocab, target_cfg.vocab_size))
      if a != b]
  own = (config.get("vsd_jax") or {}).get("target_num_hidden_layers")
  if own is not None and int(own) != target_cfg.num_layers:
    mismatch.append(f"layers: draft {own} vs target {target_cfg.num_layers}")
  if mismatch:
    raise Eagle3FormatError(f"{where} was trained for another target ({'; '.join(mismatch)}); pass the target it "
                            "was trained for with --target, or use a draft made for this target.")
  if hidden != target_hidden:
    raise Eagle3FormatError(f"{where}: its hidden size {hidden} differs from the target's {target_hidden} "
                            "(target_hidden_size); vsd_jax drafts share the target's width and embedding.")
  _check_layers(fused_layer_inputs(config, where) or tuple(target_cfg.eagle3_layers), target_cfg, where)

  tensors = _read_tensors(src_dir)
  known = {n for n, _, _ in TENSOR_TABLE} | {"d2t", "t2d"} | set(_IGNORED)
  missing = sorted({n for n, _, _ in TENSOR_TABLE} - set(tensors))
  unexpected = sorted(set(tensors) - known)
  if missing or unexpected:
    raise Eagle3FormatError(f"{where}: tensors missing {missing}, unexpected {unexpected}; it is not a standard "
                            "one-layer EAGLE-3 draft (expected fc, midlayer.*, norm, lm_head, d2t, t2d).")
  for name in _IGNORED:
    if name in tensors:
      log.warning("%s: ignoring %s; the draft uses the target's embedding", where, name)

  heads = int(config["num_attention_heads"])
  head_dim = int(config.get("head_dim") or hidden // heads)
  n = int(tensors["lm_head.weight"].shape[0])
  declared = config.get("draft_vocab_size")
  if declared is not None and int(declared) != n:
    raise Eagle3FormatError(f"{where}: config.json says draft_vocab_size={declared} but lm_head.weight has {n} "
                            f"rows; fix draft_vocab_size in config.json to {n} (the weights are authoritative).")
  dtype = _float_dtype(tensors, where)
  compute = (config.get("vsd_jax") or {}).get("compute_dtype") or ("float32" if dtype == "float16" else dtype)
  cfg = Eagle3Config.from_target(
      target_cfg, draft_vocab_size=n, num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads", heads)),
      head_dim=head_dim, intermediate_size=int(config["intermediate_size"]),
      rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), **_rope_config(config, where),
      max_position_embeddings=int(config.get("max_position_embeddings", target_cfg.max_position_embeddings)),
      dtype=compute, param_dtype=dtype)

  shapes = _expected_shapes(cfg)
  params: dict = {}
  for name, path, transpose in TENSOR_TABLE:
    w = tensors[name]
    if tuple(w.shape) != shapes[name]:
      raise Eagle3FormatError(f"{where}: {name} has shape {list(w.shape)}, expected {list(shapes[name])} from "
                              "config.json; the config does not describe these weights.")
    w = w.T if transpose else w
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(w.astype(dtype) if str(w.dtype) != dtype else w)

  d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
  if d2t is None and t2d is None:
    if n != cfg.vocab_size:
      raise Eagle3FormatError(f"{where}: no d2t/t2d vocabulary maps but the draft vocabulary ({n}) is smaller than "
                              f"the target's ({cfg.vocab_size}); add the d2t and t2d buffers the draft was trained "
                              "with (SpecForge writes them into model.safetensors).")
    d2t, t2d = np.zeros(n, np.int64), np.ones(cfg.vocab_size, bool)
  elif t2d is None:  # derive the one from the other
    t2d = np.zeros(cfg.vocab_size, bool)
    ids = np.arange(n) + d2t.astype(np.int64)
    t2d[ids[(ids >= 0) & (ids < cfg.vocab_size)]] = True
  elif d2t is None:
    ids = np.flatnonzero(t2d)
    d2t = ids - np.arange(ids.size)
  t2d = np.asarray(t2d).astype(bool)
  _check_vocab_maps(np.asarray(d2t), t2d, cfg.vocab_size, n, where)
  return save_draft(output_dir, cfg, params, np.asarray(d2t).astype(np.int32), t2d, target_cfg)


def _expected_shapes(cfg: Eagle3Config) -> dict:
  h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
  return {
      "fc.weight": (h, 3 * h), "midlayer.input_layernorm.weight": (h,), "midlayer.hidden_norm.weight": (h,),
      "midlayer.self_attn.q_proj.weight": (q, 2 * h), "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
      "midlayer.self_attn.v_proj.weight": (kv, 2 * h), "midlayer.self_attn.o_proj.weight": (h, q),
      "midlayer.post_attention_layernorm.weight": (h,), "midlayer.mlp.gate_proj.weight": (i, h),
      "midlayer.mlp.up_proj.weight": (i, h), "midlayer.mlp.down_proj.weight": (h, i), "norm.weight": (h,),
      "lm_head.weight": (cfg.draft_vocab_size, h)}

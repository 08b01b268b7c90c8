"""Dry run: compile the real train step for the configured mesh on abstract arrays and report memory.

  python -m vsd_jax.train --config configs/llama3.py:70b --dry_run [--dry_run_seq_len=1024]

No weights or data are loaded: the target's parameters are ShapeDtypeStructs of the architecture in
config.model.arch (or ARCHS[config.model.name] of vsd_jax/models/archs.py), the draft vocabulary is a stand-in
of the configured size, and the method comes from vsd_jax/methods (config.method: eagle3 or vsd), so the
step compiled is the one train_loop runs. On a machine without the chips, host CPU devices stand in for them:
the CLI sets XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size> before JAX starts.

Per-device figures: parameters, optimiser state and frozen target from the shardings (exact), activations =
XLA's temporary buffers of the compiled step (memory_analysis), FLOPs from XLA's cost analysis (per device
program) and an analytic 2*params*tokens count. A total over config.mesh.device_memory_gib raises
DoesNotFitError naming the figures and what to change.

JAX, and every module that imports it, is imported inside the functions: the host device count
(XLA_FLAGS, ensure_host_devices) must be set before JAX starts, and `train.py --dry_run` imports this module first.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from vsd_jax.config_base import mesh_axis_sizes
from vsd_jax.errors import UserError
# Hub architectures by registry name: the one table (it imports no JAX; re-exported as dry_run.ARCHS).
from vsd_jax.models import archs
from vsd_jax.models.archs import ARCHS  # noqa: F401  (re-exported: dry_run.ARCHS)
from vsd_jax.models.draft_vocab import DraftVocab
from vsd_jax.resolved import resolve

GIB = 1024 ** 3

# HBM per chip (GiB) by accelerator name, for config.mesh.device_memory_gib = 0 with config.mesh.slice set.
DEVICE_MEMORY_GIB = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0, "v6e": 32.0, "h100": 80.0,
                     "h200": 141.0, "a100": 80.0}


class DryRunError(UserError):
  pass


class DoesNotFitError(DryRunError):
  pass


def pod_config(config):
  """config as a dry run compiles it: a mesh sized to the devices present (an axis of -1) becomes the config's pod
  preset (mesh.slice, see config_base.pod_mesh), the layout a dry run is for; a fixed mesh or a named preset stays."""
  sizes, _ = mesh_axis_sizes(config)
  pod = str(config.mesh.get("slice", "") or "")
  if -1 not in sizes.values() or pod not in (config.mesh.get("presets", None) or {}):
    return config
  config = config.copy_and_resolve_references()
  config.mesh.preset = pod
  return config


def mesh_size(config) -> int:
  """Devices the mesh of pod_config(config) needs (every mesh axis must be fixed for a dry run)."""
  sizes, source = mesh_axis_sizes(pod_config(config))
  if any(s < 1 for s in sizes.values()):
    raise DryRunError(f"a dry run needs a fixed mesh, got {sizes} ({source}); set every one of "
                      f"--config.mesh.data/fsdp/tensor to a positive size (their product = the chips of the slice)")
  return math.prod(sizes.values())


def ensure_host_devices(n: int) -> None:
  """Make JAX start with n host CPU devices (call before JAX is imported); no-op when it already has n."""
  if "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()  # last one wins
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return
  import jax
  if jax.device_count() != n:
    raise DryRunError(f"the mesh needs {n} devices but JAX started with {jax.device_count()}; run the dry run in a "
                      f"fresh process (the CLI sets XLA_FLAGS=--xla_force_host_platform_device_count={n} itself) or "
                      f"export that before starting Python")


def device_memory_gib(config, override: float = 0.0) -> Optional[float]:
  """Per-device memory limit: `override`, config.mesh.device_memory_gib, else the chip of the mesh preset in use
  (config.mesh.preset, else config.mesh.slice)."""
  gib = float(override or config.mesh.get("device_memory_gib", 0) or 0)
  if gib > 0:
    return gib
  name = str(config.mesh.get("preset", "") or config.mesh.get("slice", "") or "").lower()
  for prefix in sorted(DEVICE_MEMORY_GIB, key=len, reverse=True):
    if name.startswith(prefix):
      return DEVICE_MEMORY_GIB[prefix]
  return None


def target_config(config):
  """LlamaConfig of the target from config.model.arch, else ARCHS[config.model.name]; a LlavaConfig (that
  language model + config.model.llava, else LLAVA_ARCHS[config.model.name]) for a multimodal target."""
  from vsd_jax.models.llama import LlamaConfig
  arch = dict(config.model.get("arch", None) or {})
  if not arch:
    try:
      arch = archs.arch(config.model.name)
    except KeyError as e:
      raise DryRunError(e.args[0]) from None
  arch["eos_token_ids"] = tuple(arch.get("eos_token_ids", (2,)))
  dtypes = dict(dtype=str(config.model.dtype), param_dtype=str(config.model.param_dtype))
  text = LlamaConfig(**arch, **dtypes)
  llava = config.model.get("llava", None) or archs.llava_arch(config.model.name)
  if not llava:
    return text
  from vsd_jax.models.clip import ClipVisionConfig
  from vsd_jax.models.llava import LlavaConfig
  llava = dict(llava)
  return LlavaConfig(text=text, vision=ClipVisionConfig(**dict(llava.pop("vision")), **dtypes), **llava)


def target_model(cfg):
  """The target module of a target_config: LlamaForCausalLM, or LlavaForConditionalGeneration for a LlavaConfig."""
  from vsd_jax.models.llava import target_module
  return target_module(cfg)


def abstract_target(model, params, cfg):
  """A weights.Target whose params are ShapeDtypeStructs (no tokenizer): what build_method reads of a target."""
  from vsd_jax.weights import Target
  return Target(model=model, params=params, tokenizer=None, config=cfg, source="dry run (abstract)")


def stand_in_vocab(vocab_size: int, draft_vocab_size: int) -> DraftVocab:
  """A valid draft vocabulary of the configured size (the first N target ids): shapes are all that matter."""
  n = min(int(draft_vocab_size), int(vocab_size))
  t2d = np.zeros((vocab_size,), bool)
  t2d[:n] = True
  return DraftVocab(d2t=np.zeros((n,), np.int32), t2d=t2d, counts=np.zeros((n,), np.int64), coverage=float("nan"))


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
  import jax
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def _count(tree) -> int:
  import jax
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def target_bytes_per_device(config, mesh=None) -> tuple:
  """(bytes per device, bytes of the whole model) of the target as weights.load_target(mesh=..., rules=...) places
  it on config's mesh (the frozen target's layout in training): from the abstract shapes and logical shardings
  of the architecture (target_config), no weights read. mesh: default the config's (mesh_size devices)."""
  config = pod_config(config)
  if mesh is None and "jax" not in sys.modules:
    ensure_host_devices(mesh_size(config))
  import jax
  import jax.numpy as jnp

  from vsd_jax import parallel

  if mesh is None:
    n = mesh_size(config)
    if jax.device_count() < n:
      raise DryRunError(f"the mesh needs {n} devices but JAX has {jax.device_count()}; set "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
    mesh = parallel.make_mesh(config, jax.devices()[:n])
  abstract = parallel.model_abstract_params(target_model(target_config(config)), mesh,
                                            parallel.logical_axis_rules(config), jnp.zeros((1, 8), jnp.int32))
  whole = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(abstract))
  return _bytes_per_device(abstract), int(whole)


def vsd_oracle_memory(config, vocab_size: int, batch: int, batch_per_device: int) -> dict:
  """GiB of what VSD's oracle returns per step (config.vsd's M, S, K): the reduced `OracleOutputs` the loss reads
  (shapes from `oracle.reduce_logits` itself, draft_logits only with lambda_car > 0) against the float32 logits
  [B, M, S, K, V] that returning the oracle's full logits would take. Each {"whole", "per_device"} (batch split over
  devices)."""
  import jax
  import jax.numpy as jnp

  from vsd_jax.methods.vsd.oracle import reduce_logits

  v = config.vsd
  shape = (batch, int(v.num_anchors), int(v.num_paths), int(v.depth))
  n = min(int(config.data.draft_vocab_size), vocab_size)
  draft_ids = jax.ShapeDtypeStruct((n,), jnp.int32) if float(v.lambda_car) > 0 else None
  out = jax.eval_shape(functools.partial(reduce_logits, temperature=1.0),
                       jax.ShapeDtypeStruct(shape + (vocab_size,), jnp.float32),
                       jax.ShapeDtypeStruct(shape, jnp.int32), draft_ids=draft_ids)
  reduced = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(out))
  full = math.prod(shape) * vocab_size * 4
  split = lambda nbytes: dict(whole=nbytes / GIB, per_device=nbytes * batch_per_device / batch / GIB)
  return dict(full_logits=split(full), reduced=split(reduced))


def dry_run(config, seq_len: int = 0, device_memory: float = 0.0) -> dict:
  """Compile config's train step for its mesh on abstract inputs; return the per-device report.

  seq_len: padded training length T of the batch (0 = the last of config.data.buckets).
  device_memory: GiB per device to check against (0 = device_memory_gib(config); None there = no check).
  Raises DryRunError (bad setup) or DoesNotFitError (per-device total over the device memory).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from vsd_jax import parallel
  from vsd_jax.methods import build_method
  from vsd_jax.training.state import make_optimizer, state_shardings
  from vsd_jax.training.trainer import make_train_step

  config = pod_config(config)
  n = mesh_size(config)
  ensure_host_devices(n)
  mesh = parallel.make_mesh(config, jax.devices()[:n])
  rules = parallel.logical_axis_rules(config)
  tcfg = target_config(config)
  model = target_model(tcfg)
  t = int(seq_len) or int(tuple(config.data.buckets)[-1])
  b = int(config.train.batch_size)

  # Target parameters: shapes and logical shardings only.
  ids0 = jnp.zeros((1, 8), jnp.int32)
  target_sh = parallel.model_param_shardings(model, mesh, rules, ids0)
  shapes = jax.eval_shape(lambda r: nn.unbox(model.init(r, ids0)["params"]), jax.random.PRNGKey(0))
  target_params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                         shapes, target_sh)
  run = resolve(config)
  vocab = stand_in_vocab(tcfg.vocab_size, run.data.draft_vocab_size)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.draft.init_from = ""  # a trained draft only changes the values, not what is compiled
  method = build_method(cfg, abstract_target(model, target_params, tcfg), vocab)

  def init_params(rng):
    # The draft's init reads the target's embedding: rebuild the method on traced zeros (never materialised,
    # this runs only under jax.eval_shape).
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), target_params)
    return build_method(cfg, abstract_target(model, zeros, tcfg), vocab).init_params(rng)

  tx, schedule = make_optimizer(run.train)
  abstract_state, shardings = state_shardings(init_params, tx, jax.random.PRNGKey(0), mesh, rules,
                                              method.method_state)
  frozen_sh = parallel.frozen_shardings(method.frozen, target_sh, mesh)  # as train.py places them
  abstract_frozen = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), method.frozen, frozen_sh)
  host_batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
  if hasattr(tcfg, "vision"):  # LLaVA: every row carries data.max_images images (0, the data's most: taken as 1)
    v = tcfg.vision
    host_batch["pixel_values"] = jax.ShapeDtypeStruct(
        (b, max(1, run.data.max_images), v.num_channels, v.image_size, v.image_size), jnp.float32)
  batch_sh = parallel.batch_shardings(host_batch, mesh, rules)
  abstract_batch = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          host_batch, batch_sh)
  step = make_train_step(method.loss_fn, tx, mesh=mesh, rules=rules, shardings=shardings,
                         frozen_shardings=frozen_sh, batch_shardings=batch_sh, lr_schedule=schedule,
                         stateful=method.method_state is not None)

  t0 = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = step.jitted.lower(abstract_state, abstract_frozen, abstract_batch)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()

  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  params_b = _bytes_per_device(abstract_state.params)
  opt_b = _bytes_per_device(abstract_state.opt_state)
  frozen_b = _bytes_per_device(abstract_frozen)
  batch_b = _bytes_per_device(abstract_batch)
  other_b = _bytes_per_device(abstract_state) - params_b - opt_b
  temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
  code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
  # The state is donated (its outputs alias its inputs), so arguments + temporaries is the peak bound.
  total_b = params_b + opt_b + other_b + frozen_b + batch_b + temp_b + code_b
  draft_n, target_n = _count(abstract_state.params), _count(target_params)
  tokens = b * t
  limit = device_memory_gib(config, device_memory)
  report = dict(
      model=str(config.model.name), method=str(config.method), slice=str(config.mesh.get("slice", "") or ""),
      mesh=dict(mesh.shape), devices=n, batch=b, seq_len=t, dtype=str(config.model.param_dtype),
      target_params=target_n, draft_params=draft_n,
      per_device_gib=dict(params=params_b / GIB, opt_state=opt_b / GIB, frozen_target=frozen_b / GIB,
                          batch=batch_b / GIB, method_state_and_step=other_b / GIB, activations_temp=temp_b / GIB,
                          code=code_b / GIB, total=total_b / GIB),
      xla=dict(argument_gib=int(getattr(mem, "argument_size_in_bytes", 0)) / GIB,
               output_gib=int(getattr(mem, "output_size_in_bytes", 0)) / GIB,
               alias_gib=int(getattr(mem, "alias_size_in_bytes", 0)) / GIB),
      flops_per_device_xla=float(cost.get("flops", 0.0)),
      # Target forward 2*N*tokens; draft forward + backward 6*N*tokens per TTT step (EAGLE-3's unroll).
      flops_per_step_analytic=2.0 * target_n * tokens + 6.0 * draft_n * tokens * int(config.draft.ttt_steps),
      device_memory_gib=limit, lower_s=t1 - t0, compile_s=t2 - t1)
  loaded_b, whole_b = target_bytes_per_device(config, mesh)
  report["loaded_target_gib"] = dict(per_device=loaded_b / GIB, whole=whole_b / GIB)
  if str(config.method) == "vsd" and str(config.vsd.estep) != "exact":  # the exact objective has no oracle
    report["vsd_oracle_gib"] = vsd_oracle_memory(config, tcfg.vocab_size, b,
                                                 abstract_batch["input_ids"].sharding.shard_shape((b, t))[0])
  if limit is not None and total_b / GIB > limit:
    raise DoesNotFitError(
        f"{report['model']} ({report['method']}) does not fit: {total_b / GIB:.2f} GiB per device on mesh "
        f"{report['mesh']} exceeds the {limit:g} GiB of a device (config.mesh.device_memory_gib or slice) "
        f"({format_report(report)}). Fix: a larger slice or mesh.fsdp/tensor (shards params and target), a smaller "
        f"train.batch_size or data.buckets" + ("" if report["dtype"] == "bfloat16" else ", or model.param_dtype=bfloat16"))
  return report


def format_report(r: dict) -> str:
  g = r["per_device_gib"]
  lines = [f"dry run: {r['model']} method={r['method']} slice={r['slice'] or '-'} mesh={r['mesh']} "
           f"({r['devices']} devices) batch={r['batch']}x{r['seq_len']} {r['dtype']}",
           f"  target params {r['target_params'] / 1e9:.2f}B, draft params {r['draft_params'] / 1e6:.1f}M",
           "  per device (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in g.items()),
           f"  device memory: {r['device_memory_gib'] if r['device_memory_gib'] else 'not set'} GiB",
           f"  loaded target (weights.load_target on this mesh): {r['loaded_target_gib']['per_device']:.3f} GiB per "
           f"device of {r['loaded_target_gib']['whole']:.3f} GiB",
           f"  FLOPs/step: XLA {r['flops_per_device_xla']:.3e} per device program, "
           f"analytic {r['flops_per_step_analytic']:.3e} total (2*N_target*tokens + 6*N_draft*tokens*ttt_steps)",
           f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"]
  if "vsd_oracle_gib" in r:
    o = r["vsd_oracle_gib"]
    lines.insert(-1, f"  VSD oracle output: {o['reduced']['per_device']:.3f} GiB per device "
                     f"({o['reduced']['whole']:.3f} whole), was {o['full_logits']['per_device']:.3f} "
                     f"({o['full_logits']['whole']:.3f}) as full logits")
  return "\n".join(lines)

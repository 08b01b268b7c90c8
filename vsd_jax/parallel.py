"""Device mesh, logical axis rules and multi-host initialisation.

Parameters carry logical axis names ("vocab", "embed", "heads", "kv_heads", "mlp", "norm", "layers");
batches use "batch". `config.mesh.rules` maps each logical name to mesh axes of the mesh
(`data`, `fsdp`, `tensor`), as a comma-separated string ("" = replicated), e.g.

    --config.mesh.data=2 --config.mesh.fsdp=4 --config.mesh.rules.embed=fsdp

Everything that places arrays (train state, frozen target weights, batches) gets its NamedShardings
from here, so one config line changes the layout of the whole program.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vsd_jax.config_base import MESH_AXES, mesh_axis_sizes  # noqa: F401  (MESH_AXES: parallel.MESH_AXES too)
from vsd_jax.errors import UserError

Rules = tuple  # ((logical_name, mesh_axis | (mesh_axes...) | None), ...), flax's LogicalRules format


class MeshError(UserError):
  """config.mesh (sizes, rules) that does not fit the devices or the arrays; the message names the field."""


def mesh_shape(config, num_devices: int) -> tuple:
  """(data, fsdp, tensor) sizes from config.mesh (its preset, else its sizes); one of them may be -1 (= the
  remaining devices)."""
  by_axis, source = mesh_axis_sizes(config)
  sizes = [by_axis[a] for a in MESH_AXES]
  desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes)) + f" ({source})"
  if sum(s == -1 for s in sizes) > 1:
    raise MeshError(f"{desc}: at most one mesh axis may be -1 (the remaining devices)")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"{desc}: mesh axis sizes must be positive or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise MeshError(f"{desc}: the fixed axes use {fixed} devices, which does not divide the "
                      f"{num_devices} available devices; change the mesh sizes")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    fix = (f"run it where {math.prod(sizes)} devices are present, or leave --config.mesh.preset unset to size the "
           "mesh to the devices present" if "preset" in source else
           f"make the product equal {num_devices} or set one axis to -1")
    raise MeshError(f"{desc}: the mesh has {math.prod(sizes)} devices but {num_devices} are available; {fix}")
  return tuple(sizes)


def make_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh over all (or the given) devices with axes (data, fsdp, tensor), in GSPMD (Auto) mode."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  sizes, source = mesh_axis_sizes(config)
  how = source if "preset" in source else f"config {', '.join(f'{a}={n}' for a, n in sizes.items())}" + (
      "; -1 takes the devices present" if -1 in sizes.values() else "")
  presets = sorted(config.mesh.get("presets", None) or {})
  if presets and "preset" not in source:
    how += f"; presets: {', '.join(presets)} (--config.mesh.preset=NAME)"
  logging.info("mesh: %s over %d %s device(s) (%s)", " x ".join(f"{a} {n}" for a, n in zip(MESH_AXES, shape)),
               len(devices), devices[0].platform, how)
  return _mesh(shape, devices)


def _mesh(shape: tuple, devices: Sequence[jax.Device]) -> Mesh:
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    # Topology-aware placement only knows some device kinds (TPU); any order works elsewhere.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_axis_rules(config) -> Rules:
  """config.mesh.rules (logical name -> "axis,axis" or "") as flax logical axis rules."""
  rules = []
  for name, value in dict(config.mesh.rules).items():
    if value is None:
      value = ""
    if not isinstance(value, str):
      value = ",".join(value)
    axes = tuple(a.strip() for a in value.split(",") if a.strip())
    for a in axes:
      if a not in MESH_AXES:
        raise MeshError(f"mesh.rules.{name}={value!r} names mesh axis {a!r}; mesh axes are {MESH_AXES} "
                        f"(use \"\" for replicated)")
    rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(rules)


def _mesh_axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _check_divisible(path, shape, spec: P, mesh: Mesh):
  for dim, axes in zip(shape, spec):
    n = _mesh_axes_size(mesh, axes)
    if dim % n:
      raise MeshError(
          f"{jax.tree_util.keystr(path)} of shape {tuple(shape)} cannot be split over mesh axes {axes} "
          f"({n} devices) along a dimension of size {dim}; change config.mesh.rules or the mesh sizes")


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree whose leaves may be boxed with logical axis names.

  `abstract_tree` is typically `jax.eval_shape(init_fn, rng)` of a Flax init (leaves wrapped in
  nn.Partitioned / LogicallyPartitioned). Unboxed leaves are replicated. The result has the *unboxed*
  structure (what `nn.unbox` of the tree gives), one NamedSharding per array.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  values = nn.unbox(abstract_tree)
  jax.tree_util.tree_map_with_path(
      lambda path, x, s: _check_divisible(path, x.shape, s.spec, mesh), values, shardings)
  return shardings


def shardings_from_init(init_fn: Callable, *args, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings of the (unboxed) output of `init_fn(*args)`, e.g. a Flax `model.init`."""
  return logical_shardings(jax.eval_shape(init_fn, *args), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(ndim: int, rules: Rules) -> P:
  """[B, ...] arrays: the leading axis over the "batch" rule's mesh axes, the rest replicated."""
  if ndim == 0:
    return P()
  axes = dict(rules).get("batch")
  return P(axes, *([None] * (ndim - 1)))


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree of [B, ...] arrays (anything with .ndim/.shape)."""
  n = _mesh_axes_size(mesh, dict(rules).get("batch"))

  def one(path, x):  # x: this process's [B_local, ...] slice
    if np.ndim(x) and (np.shape(x)[0] * jax.process_count()) % n:
      raise MeshError(f"batch{jax.tree_util.keystr(path)} has global batch size "
                      f"{np.shape(x)[0] * jax.process_count()}, not divisible by the {n} devices of the "
                      f"batch mesh axes {dict(rules).get('batch')}; use a batch size that is a multiple "
                      f"of {n}")
    return NamedSharding(mesh, batch_spec(np.ndim(x), rules))

  return jax.tree_util.tree_map_with_path(one, batch)


def shard_batch(batch: Any, shardings: Any) -> Any:
  """Host arrays -> global jax.Arrays. Each process passes its own slice of the global batch
  (all of it on one host); leaves are [B_local, ...]."""
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)
  return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), batch, shardings)


def place(tree: Any, shardings: Any) -> Any:
  """Put a pytree of host or device arrays onto the mesh with the given shardings."""
  return jax.device_put(tree, shardings)


def shardings_of(tree: Any, mesh: Mesh) -> Any:
  """Shardings of already placed arrays; anything not on `mesh` (host arrays, single-device arrays)
  becomes replicated."""
  def one(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return s
    return replicated(mesh)
  return jax.tree_util.tree_map(one, tree)


def _multi_host_environment() -> bool:
  """True when the environment describes a job of several processes."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
      return True
  return False


def maybe_initialize_distributed(config) -> bool:
  """Call jax.distributed.initialize when the job has several processes; returns whether it did.

  Must run before anything touches a JAX device. config.mesh.distributed:
    "off"  never (single process);
    "on"   always, with config.mesh.coordinator_address / num_processes / process_id when set
           (-1 / "" = let JAX detect them: TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS);
    "auto" (default) when a coordinator address is configured or the environment describes a
           multi-process job (TPU pod workers, SLURM/MPI with several tasks).
  """
  mode = str(config.mesh.get("distributed", "auto"))
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"mesh.distributed={mode!r}; use 'auto', 'on' or 'off'")
  if mode == "off" or jax.distributed.is_initialized():
    return False
  address = config.mesh.get("coordinator_address", "") or None
  if mode == "auto" and address is None and not _multi_host_environment():
    return False
  num = int(config.mesh.get("num_processes", -1))
  pid = int(config.mesh.get("process_id", -1))
  # SIGTERM on any host -> every process stops at the same step (Checkpoints.reached_preemption); JAX's default.
  jax.config.update("jax_enable_preemption_service", True)
  jax.distributed.initialize(coordinator_address=address, num_processes=None if num < 0 else num,
                             process_id=None if pid < 0 else pid)
  logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
  return True


_BARRIERS: dict = {}


def process_barrier(name: str, timeout_s: float = 24 * 3600) -> None:
  """Wait until every process has reached the barrier `name` (nothing with one process).

  Through the jax.distributed coordination service (its key-value store's barrier: no device collective, so a
  process that spent hours longer generating does not trip a collective's timeout), else a device collective
  (multihost_utils.sync_global_devices). Every process must call the same barriers in the same order: the n-th
  call of a name is barrier "<name>-<n>" on each of them."""
  if jax.process_count() == 1:
    return
  n = _BARRIERS.get(name, 0)
  _BARRIERS[name] = n + 1
  barrier_id = f"vsd_jax-{name}-{n}"
  try:
    from jax._src import distributed
    client = distributed.global_state.client
  except ImportError:
    client = None
  if client is not None and hasattr(client, "wait_at_barrier"):
    client.wait_at_barrier(barrier_id, timeout_in_ms=int(timeout_s * 1000))
  else:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(barrier_id)


def process_local_slice(batch: Any, index: Optional[int] = None, count: Optional[int] = None) -> Any:
  """This process's rows of a global host batch: [B, ...] -> [B / count, ...] (rows index*B/count...).

  Every process builds the same global batch (same seed and step) and keeps its own contiguous rows,
  which is the layout jax.make_array_from_process_local_data expects for a batch-sharded leading axis.
  (Where the mesh does not order processes along the batch axes by index, whole per-process blocks of rows
  land permuted in the global array; every row is still used once.)
  """
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if count == 1:
    return batch

  def one(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      return x
    if x.shape[0] % count:
      raise MeshError(f"batch{jax.tree_util.keystr(path)} has global batch size {x.shape[0]}, not divisible "
                      f"by the {count} processes; use a batch size that is a multiple of {count}")
    n = x.shape[0] // count
    return x[index * n:(index + 1) * n]

  return jax.tree_util.tree_map_with_path(one, batch)


def model_param_shardings(model: nn.Module, mesh: Mesh, rules: Rules, *example_args) -> Any:
  """NamedShardings of a Flax model's (unboxed) parameters from their logical axis names, e.g. the
  frozen target's: `model_param_shardings(LlamaForCausalLM(cfg), mesh, rules, ids)` with ids int32 [1, T]."""
  return shardings_from_init(lambda r: model.init(r, *example_args)["params"], jax.random.PRNGKey(0),
                             mesh=mesh, rules=rules)


def model_abstract_params(model: nn.Module, mesh: Mesh, rules: Rules, *example_args) -> Any:
  """A Flax model's (unboxed) parameters as jax.ShapeDtypeStructs carrying their NamedShardings (logical axes
  under `rules`): what weights.load_target builds on a mesh and what --dry_run counts; no array is made."""
  shapes = jax.eval_shape(lambda r: nn.unbox(model.init(r, *example_args)["params"]), jax.random.PRNGKey(0))
  shardings = model_param_shardings(model, mesh, rules, *example_args)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def decode_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The mesh generate/evaluate place the target on: config.mesh's fsdp x tensor axes over the first devices,
  data = 1 (decoding does not split the batch across devices). With the defaults (fsdp = tensor = 1) that is
  one device, as decoding always ran; an axis of -1 takes the remaining devices. Where fewer devices are
  present than fsdp x tensor (a pod config on a workstation), one device, with a warning."""
  devices = list(jax.devices() if devices is None else devices)
  sizes, source = mesh_axis_sizes(config)
  fsdp, tensor = sizes["fsdp"], sizes["tensor"]
  if fsdp == -1 and tensor == -1:
    raise MeshError(f"fsdp={fsdp}, tensor={tensor} ({source}): at most one mesh axis may be -1")
  fsdp = len(devices) // max(tensor, 1) if fsdp == -1 else fsdp
  tensor = len(devices) // max(fsdp, 1) if tensor == -1 else tensor
  if fsdp < 1 or tensor < 1:
    raise MeshError(f"fsdp={sizes['fsdp']}, tensor={sizes['tensor']} ({source}): sizes must be positive or -1")
  if fsdp * tensor > len(devices):
    logging.warning("mesh.fsdp x mesh.tensor = %d x %d devices but %d are present: decoding on one device",
                    fsdp, tensor, len(devices))
    fsdp = tensor = 1
  return _mesh((1, fsdp, tensor), devices[:fsdp * tensor])


def frozen_shardings(frozen: dict, target_shardings: Any, mesh: Mesh) -> dict:
  """A method's frozen inputs: the target's parameters by their logical axes, the rest (vocab maps) replicated."""
  return {k: target_shardings if k == "target" else replicated(mesh) for k in frozen}


def target_frozen_shardings(frozen: dict, target_model: nn.Module, mesh: Mesh, rules: Rules) -> dict:
  """How training places a method's frozen inputs (train.py; pass to train_loop's frozen_shardings): the
  target's parameters (frozen["target"]) sharded by `target_model`'s logical axes under `rules`, not
  replicated per device; everything else replicated. Raises MeshError naming a parameter the mesh cannot split.

  frozen: {"target": the target's unboxed params, other name: array} (methods.Method.frozen).
  """
  if "target" not in frozen:
    raise ValueError(f"frozen has no 'target' entry (keys {sorted(frozen)}); the method's frozen inputs must "
                     f"hold the target's parameters under 'target'")
  ids = np.zeros((1, 8), np.int32)  # any [1, T] token ids: only the parameter shapes matter
  return frozen_shardings(frozen, model_param_shardings(target_model, mesh, rules, ids), mesh)

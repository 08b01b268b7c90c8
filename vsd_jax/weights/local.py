"""The target on this process's devices only, for the work each process does on its own share of the data
(regenerating responses, the precomputed feature pass) in a job of several processes.

Training places the target on the mesh of all processes (its forwards are collective); a process that generates
its own prompts must not wait on the others, so it gets a copy of the target on `parallel.decode_mesh` over its
local devices (config.mesh's fsdp x tensor axes), read again from the same files: each local device's block only,
as load_target does on any mesh. The copy has to fit one host's devices; nothing keeps it, so its device memory
is freed when the stage that asked for it drops it (training does not carry it).
"""

from __future__ import annotations

import dataclasses


def is_process_local(params) -> bool:
  """Whether every array of `params` lives on this process's devices (host arrays count as local)."""
  import jax
  return all(getattr(x, "is_fully_addressable", True) for x in jax.tree_util.tree_leaves(params))


def process_local_target(target, config):
  """`target` itself with one process or when its parameters are already on this process's devices; else a copy
  whose parameters are on this process's devices (loaded from target.source with config.model's dtypes)."""
  import jax

  if jax.process_count() == 1 or is_process_local(target.params):
    return target
  from vsd_jax import parallel
  from vsd_jax.weights.registry import load_target

  mesh = parallel.decode_mesh(config, jax.local_devices())
  local = load_target(target.source, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                      with_tokenizer=False, mesh=mesh, rules=parallel.logical_axis_rules(config))
  return dataclasses.replace(target, params=local.params)

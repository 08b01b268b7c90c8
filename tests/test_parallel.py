"""Mesh construction, logical axis rules, parameter/batch shardings and multi-host init (8 CPU devices)."""

from tests.multidevice import needs_8_devices

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vsd_jax import parallel
from vsd_jax.config_base import base_config
from vsd_jax.models.llama import LlamaConfig, LlamaForCausalLM


def cfg(data=-1, fsdp=1, tensor=1):
  c = base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


def test_mesh_shape_fills_minus_one_and_rejects_bad_products():
  assert parallel.mesh_shape(cfg(), 8) == (8, 1, 1)
  assert parallel.mesh_shape(cfg(2, -1, 2), 8) == (2, 2, 2)
  assert parallel.mesh_shape(cfg(2, 4, 1), 8) == (2, 4, 1)
  with pytest.raises(parallel.MeshError, match=r"mesh has 4 devices but 8 are available"):
    parallel.mesh_shape(cfg(2, 2, 1), 8)
  with pytest.raises(parallel.MeshError, match="at most one mesh axis may be -1"):
    parallel.mesh_shape(cfg(-1, -1, 1), 8)
  with pytest.raises(parallel.MeshError, match="does not divide the 8 available devices"):
    parallel.mesh_shape(cfg(-1, 3, 1), 8)
  with pytest.raises(parallel.MeshError, match="positive or -1"):
    parallel.mesh_shape(cfg(0, 1, 1), 8)


@needs_8_devices
def test_make_mesh_axes_and_devices():
  mesh = parallel.make_mesh(cfg(2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  one = parallel.make_mesh(cfg(1, 1, 1), jax.devices()[:1])
  assert one.devices.size == 1


def test_rules_parse_config_and_reject_unknown_axes():
  rules = dict(parallel.logical_axis_rules(base_config()))
  assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp" and rules["vocab"] == "tensor"
  assert rules["norm"] is None and rules["layers"] is None
  c = base_config()
  c.mesh.rules.embed = "model"
  with pytest.raises(parallel.MeshError, match=r"mesh.rules.embed='model' names mesh axis 'model'"):
    parallel.logical_axis_rules(c)


TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def _llama_init(rng):
  return LlamaForCausalLM(TINY).init(rng, jnp.zeros((1, 4), jnp.int32))


@needs_8_devices
def test_llama_param_shardings_follow_logical_names():
  c = cfg(2, 2, 2)
  mesh, rules = parallel.make_mesh(c), parallel.logical_axis_rules(c)
  sh = parallel.shardings_from_init(_llama_init, jax.random.PRNGKey(0), mesh=mesh, rules=rules)["params"]
  assert sh["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
  layer = sh["layers"]["self_attn"]
  assert layer["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")   # [L, embed, heads]
  assert layer["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")   # [L, heads, embed]
  assert sh["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert sh["norm"]["scale"].spec == P(None)
  # Placing real parameters with them shards the arrays.
  params = jax.jit(lambda r: nn.unbox(_llama_init(r))["params"],
                   out_shardings=sh)(jax.random.PRNGKey(0))
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (2, 32, 32) and q.addressable_shards[0].data.shape == (2, 16, 16)


@needs_8_devices
def test_indivisible_parameter_is_a_clear_error():
  c = cfg(1, 1, 8)  # 8-way tensor split of the 2 kv heads x 8 = 16-wide k_proj works, vocab 64 works, ...
  mesh, rules = parallel.make_mesh(c), parallel.logical_axis_rules(c)
  odd = TINY.replace(intermediate_size=60)  # ... but an mlp of 60 does not split 8 ways
  init = lambda r: LlamaForCausalLM(odd).init(r, jnp.zeros((1, 4), jnp.int32))
  msg = r"\['mlp'\]\['down_proj'\]\['kernel'\] of shape \(2, 60, 32\) cannot be split over mesh axes tensor"
  with pytest.raises(parallel.MeshError, match=msg):
    parallel.shardings_from_init(init, jax.random.PRNGKey(0), mesh=mesh, rules=rules)


@needs_8_devices
def test_batch_shardings_split_leading_axis_over_data_and_fsdp():
  c = cfg(2, 2, 2)
  mesh, rules = parallel.make_mesh(c), parallel.logical_axis_rules(c)
  batch = {"ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "n": np.int32(3)}
  sh = parallel.batch_shardings(batch, mesh, rules)
  assert sh["ids"].spec == P(("data", "fsdp"), None) and sh["n"].spec == P()
  placed = parallel.shard_batch(batch, sh)
  assert placed["ids"].addressable_shards[0].data.shape == (2, 5)
  np.testing.assert_array_equal(np.asarray(placed["ids"]), batch["ids"])
  with pytest.raises(parallel.MeshError, match=r"batch\['ids'\] has global batch size 6, not divisible by the 4"):
    parallel.batch_shardings({"ids": np.zeros((6, 5))}, mesh, rules)


@needs_8_devices
def test_shardings_of_keeps_placed_and_replicates_the_rest():
  mesh = parallel.make_mesh(cfg(2, 2, 2))
  s = jax.sharding.NamedSharding(mesh, P("data"))
  tree = {"a": jax.device_put(jnp.ones((4,)), s), "b": np.ones(3), "c": jnp.ones(2)}
  out = parallel.shardings_of(tree, mesh)
  assert out["a"] == s and out["b"].spec == P() and out["c"].spec == P()


def test_distributed_init_is_skipped_for_single_process(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
              "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  c = base_config()
  assert parallel.maybe_initialize_distributed(c) is False and not calls
  # A TPU pod's worker list (several hosts) means multi-host: JAX detects the rest.
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert parallel.maybe_initialize_distributed(c) is True
  assert calls[-1] == {"coordinator_address": None, "num_processes": None, "process_id": None}
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  c.mesh.coordinator_address, c.mesh.num_processes, c.mesh.process_id = "host0:1234", 4, 2
  assert parallel.maybe_initialize_distributed(c) is True
  assert calls[-1] == {"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2}
  c.mesh.distributed = "off"
  assert parallel.maybe_initialize_distributed(c) is False and len(calls) == 2
  c.mesh.distributed = "sometimes"
  with pytest.raises(ValueError, match="mesh.distributed='sometimes'"):
    parallel.maybe_initialize_distributed(c)

"""Loading a target straight into its shardings (weights.load_target(mesh=..., rules=...)) on 8 host devices:
the intended NamedSharding on every parameter, the same values as the one-device load, and no device or
safetensors read ever holding a whole sharded tensor."""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from tests.multidevice import needs_8_devices

torch = pytest.importorskip("torch")


def _mesh_config(data, fsdp, tensor):
  from vsd_jax.config_base import base_config
  c = base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random LLaMA (untied head, GQA) saved by transformers in bfloat16 as several safetensors files."""
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  path = tmp_path_factory.mktemp("tiny_llama")
  LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
  assert len(list(path.glob("*.safetensors"))) > 1
  return str(path)


def _hf_shapes(directory):
  from safetensors import safe_open
  shapes = {}
  for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    with safe_open(f, framework="numpy") as h:
      shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
  return shapes


@needs_8_devices
@pytest.mark.parametrize("param_dtype,scan_layers", [("bfloat16", True), ("float32", False)])
def test_sharded_load_matches_one_device_load(hf_dir, monkeypatch, param_dtype, scan_layers):
  from vsd_jax import parallel
  from vsd_jax.weights import load_target
  from vsd_jax.weights import hf
  from vsd_jax.weights.convert import param_sources

  ref = load_target(hf_dir, dtype=param_dtype, with_tokenizer=False, scan_layers=scan_layers)

  reads = []  # (hf name, returned block shape) of every read the sharded load makes
  block_read = hf._TensorIndex.get_slice

  def recording_get_slice(self, name, index):
    x = block_read(self, name, index)
    reads.append((name, x.shape))
    return x

  def no_whole_read(self, name):
    raise AssertionError(f"the sharded load read the whole tensor {name!r}")

  monkeypatch.setattr(hf._TensorIndex, "get_slice", recording_get_slice)
  monkeypatch.setattr(hf._TensorIndex, "get", no_whole_read)
  config = _mesh_config(2, 2, 2)
  mesh = parallel.make_mesh(config, jax.devices()[:8])
  rules = parallel.logical_axis_rules(config)
  got = load_target(hf_dir, dtype=param_dtype, with_tokenizer=False, mesh=mesh, rules=rules,
                    scan_layers=scan_layers)

  assert got.config == ref.config
  intended = parallel.model_param_shardings(got.model, mesh, rules, np.zeros((1, 8), np.int32))
  leaves = jax.tree_util.tree_leaves_with_path(got.params)
  ref_leaves = dict(jax.tree_util.tree_leaves_with_path(ref.params))
  want = dict(jax.tree_util.tree_leaves_with_path(intended))
  assert len(leaves) == len(ref_leaves) == len(want)
  sharded_paths = set()
  for path, x in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(x, jax.Array) and x.sharding == want[path], name
    assert x.dtype == np.dtype(param_dtype) and x.shape == ref_leaves[path].shape, name
    shard_shape = want[path].shard_shape(x.shape)
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:  # each device holds its block, never the whole tensor of a split one
      assert shard.data.shape == shard_shape, name
    if shard_shape != x.shape:
      sharded_paths.add(tuple(k.key for k in path))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref_leaves[path]), err_msg=name)
  assert len(sharded_paths) >= 8  # embedding, head and every kernel are split on this mesh

  # The source side: every tensor of a split parameter was only ever read in blocks smaller than itself.
  shapes = _hf_shapes(hf_dir)
  split_names = {n for p, src in param_sources(got.config, lambda n: n in shapes).items() if p in sharded_paths
                 for n in src.hf_names}
  assert {n for n, _ in reads} == set(shapes)
  for name, block in reads:
    if name in split_names:
      assert np.prod(block) < np.prod(shapes[name]), (name, block, shapes[name])


@needs_8_devices
def test_sharded_forward_matches_one_device(hf_dir):
  """The sharded parameters run the model as the one-device ones do."""
  import jax.numpy as jnp
  from vsd_jax import parallel
  from vsd_jax.weights import load_target
  ref = load_target(hf_dir, with_tokenizer=False)
  config = _mesh_config(1, 2, 4)
  mesh = parallel.make_mesh(config, jax.devices()[:8])
  got = load_target(hf_dir, with_tokenizer=False, mesh=mesh, rules=parallel.logical_axis_rules(config))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)))
  fwd = jax.jit(lambda p, i: got.model.apply({"params": p}, i).logits)
  np.testing.assert_allclose(np.asarray(fwd(got.params, ids)), np.asarray(fwd(ref.params, ids)), atol=1e-5)


def test_mesh_without_rules_is_an_error(hf_dir):
  from vsd_jax import parallel
  from vsd_jax.weights import load_target
  with pytest.raises(ValueError, match="rules"):
    load_target(hf_dir, with_tokenizer=False, mesh=parallel.make_mesh(_mesh_config(1, 1, 1), jax.devices()[:1]))


@needs_8_devices
def test_decode_mesh():
  """generate/evaluate's mesh: config's fsdp x tensor (data 1); one device by default or when too few are present."""
  from vsd_jax import parallel
  assert dict(parallel.decode_mesh(_mesh_config(-1, 1, 1)).shape) == dict(data=1, fsdp=1, tensor=1)
  assert dict(parallel.decode_mesh(_mesh_config(1, 2, 2)).shape) == dict(data=1, fsdp=2, tensor=2)
  assert dict(parallel.decode_mesh(_mesh_config(1, -1, 2)).shape) == dict(data=1, fsdp=4, tensor=2)
  assert dict(parallel.decode_mesh(_mesh_config(1, 16, 2)).shape) == dict(data=1, fsdp=1, tensor=1)


@needs_8_devices
def test_dry_run_target_bytes_per_device():
  """--dry_run's loaded-target figure: the Llama-3.1-8B architecture on a (1, 4, 2) mesh holds 1/8 of every
  split parameter per device (norms replicated), computed from shapes alone."""
  from vsd_jax import dry_run
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("llama3_config", os.path.join(repo, "configs", "llama3.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("8b")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
  per_device, whole = dry_run.target_bytes_per_device(config)
  assert whole == pytest.approx(2 * 8.03e9, rel=0.01)  # bfloat16
  assert whole / 8 <= per_device <= whole / 8 * 1.001


@pytest.mark.slow
@needs_8_devices
def test_gguf_sharded_load_matches_one_device_load():
  """The packaged GGUF (quantised; dequantised per parameter on host) placed on a (1, 2, 4) mesh."""
  from vsd_jax import parallel
  from vsd_jax.weights import load_target
  config = _mesh_config(1, 2, 4)
  mesh = parallel.make_mesh(config, jax.devices()[:8])
  rules = parallel.logical_axis_rules(config)
  got = load_target("smollm2-135m-instruct", with_tokenizer=False, mesh=mesh, rules=rules)
  ref = load_target("smollm2-135m-instruct", with_tokenizer=False)
  intended = dict(jax.tree_util.tree_leaves_with_path(
      parallel.model_param_shardings(got.model, mesh, rules, np.zeros((1, 8), np.int32))))
  ref_leaves = dict(jax.tree_util.tree_leaves_with_path(ref.params))
  for path, x in jax.tree_util.tree_leaves_with_path(got.params):
    assert x.sharding == intended[path]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref_leaves[path]), err_msg=jax.tree_util.keystr(path))


@needs_8_devices
def test_untied_projection_of_a_sharded_tied_target(tmp_path):
  """Decoding's untied vocabulary projection (untie_lm_head) on a target loaded into its shardings: the new [H, V]
  kernel holds the embedding's transpose in the sharding the untied model's rules give lm_head (not a replicated
  or gathered copy), and the sharded forward gives the one-device tied logits."""
  import jax.numpy as jnp
  from transformers import LlamaConfig, LlamaForCausalLM
  from vsd_jax import parallel
  from vsd_jax.weights import load_target
  torch.manual_seed(1)
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  LlamaForCausalLM(cfg).save_pretrained(tmp_path)
  ref = load_target(str(tmp_path), with_tokenizer=False, scan_layers=False)
  assert ref.config.tie_word_embeddings and "lm_head" not in ref.params
  config = _mesh_config(1, 2, 4)
  mesh = parallel.make_mesh(config, jax.devices()[:8])
  rules = parallel.logical_axis_rules(config)
  got = load_target(str(tmp_path), with_tokenizer=False, scan_layers=False, mesh=mesh, rules=rules,
                    untie_lm_head=True)
  assert not got.config.tie_word_embeddings
  intended = parallel.model_param_shardings(got.model, mesh, rules, np.zeros((1, 8), np.int32))
  kernel = got.params["lm_head"]["kernel"]
  want = intended["lm_head"]["kernel"]
  assert kernel.sharding.is_equivalent_to(want, kernel.ndim), (kernel.sharding, want)
  assert want.shard_shape(kernel.shape) != kernel.shape  # the mesh splits it: a real placement test
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(ref.params["embed_tokens"]["embedding"]).T)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)))
  logits = jax.jit(lambda p, i: got.model.apply({"params": p}, i).logits)(got.params, ids)
  want_logits = jax.jit(lambda p, i: ref.model.apply({"params": p}, i).logits)(ref.params, ids)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5)

"""HF-directory loading and LLaMA variants (untied head, LLaMA-3 rope scaling, Vicuna-style GQA-free),
checked against transformers' PyTorch Llama on tiny random checkpoints written by transformers itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _tiny_hf(tmp_path, **kw):
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=kw.pop("kv", 2), max_position_embeddings=4096, **kw)
  m = LlamaForCausalLM(cfg).eval()
  m.save_pretrained(tmp_path, safe_serialization=kw.pop("safe", True))
  return m


@pytest.mark.parametrize("variant", [
    dict(tie_word_embeddings=False, rope_theta=500000.0,
         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=64)),
    dict(tie_word_embeddings=True, kv=4),
])
def test_hf_directory_matches_transformers(tmp_path, variant):
  from vsd_jax.weights.hf import read_hf_dir
  from vsd_jax.models.llama import LlamaForCausalLM
  m = _tiny_hf(tmp_path, **variant)
  cfg, params = read_hf_dir(str(tmp_path))
  assert cfg.tie_word_embeddings == variant["tie_word_embeddings"]
  if "rope_scaling" in variant:
    assert cfg.rope_scaling_type == "llama3"
  ids = np.random.RandomState(0).randint(0, 300, (2, 200))  # positions past original_max_position
  ours = LlamaForCausalLM(cfg).apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(ids)).logits
  with torch.no_grad():
    ref = m(torch.tensor(ids)).logits.numpy()
  assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


@pytest.mark.slow
def test_gguf_and_exported_hf_directory_agree(tmp_path, target):
  """The GGUF loader (dequantise + undo llama.cpp's q/k permutation) and transformers' own GGUF import
  followed by save_pretrained give the same parameters through our HF-directory loader."""
  import os
  from transformers import AutoModelForCausalLM
  from vsd_jax.weights.hf import read_hf_dir
  m = AutoModelForCausalLM.from_pretrained(os.path.dirname(target.source), gguf_file=os.path.basename(target.source),
                                           dtype=torch.float32)
  # transformers refuses save_pretrained on a GGUF-imported model: write its state dict ourselves.
  import json
  from safetensors.torch import save_file
  state = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
  save_file(state, str(tmp_path / "model.safetensors"))
  hf_cfg = m.config.to_dict()
  hf_cfg.pop("quantization_config", None)
  (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
  cfg, params = read_hf_dir(str(tmp_path))
  assert cfg.num_layers == 30 and cfg.num_kv_heads == 3 and cfg.rope_theta == target.config.rope_theta
  flat_ours = jax.tree_util.tree_leaves_with_path(target.params)
  flat_hf = dict(jax.tree_util.tree_leaves_with_path(params))
  assert len(flat_ours) == len(flat_hf)
  for path, leaf in flat_ours:
    np.testing.assert_allclose(np.asarray(leaf), flat_hf[path], atol=1e-6, err_msg=str(path))


def test_unpermute_inverts_llama_cpp_permutation():
  from vsd_jax.weights.gguf_file import unpermute_qk
  heads, d, width = 3, 8, 5
  w = np.arange(heads * d * width, dtype=np.float32).reshape(heads * d, width)
  # llama.cpp's convert script: reshape(heads, 2, d/2, ...).swapaxes(1, 2)
  permuted = w.reshape(heads, 2, d // 2, width).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(unpermute_qk(permuted, heads), w)
  assert not np.array_equal(permuted, w)


def test_untied_lm_head_keeps_the_logits(tmp_path):
  """untie_lm_head (decoding's CPU layout) gives a tied model its own [H, V] kernel with the same logits, also against
  transformers; decoding_load_options resolves config.generate.untie_lm_head and names the field when it is bad."""
  from vsd_jax.config_base import base_config
  from vsd_jax.weights import decoding_load_options, load_target
  m = _tiny_hf(tmp_path, tie_word_embeddings=True)
  tied = load_target(str(tmp_path), with_tokenizer=False, scan_layers=False)
  untied = load_target(str(tmp_path), with_tokenizer=False, scan_layers=False, untie_lm_head=True)
  assert tied.config.tie_word_embeddings and not untied.config.tie_word_embeddings
  np.testing.assert_array_equal(untied.params["lm_head"]["kernel"], tied.params["embed_tokens"]["embedding"].T)
  ids = np.random.RandomState(1).randint(0, 300, (2, 40))
  a = np.asarray(tied.model.apply({"params": tied.params}, jnp.asarray(ids)).logits)
  b = np.asarray(untied.model.apply({"params": untied.params}, jnp.asarray(ids)).logits)
  with torch.no_grad():
    ref = m(torch.tensor(ids)).logits.numpy()
  assert np.abs(b - a).max() <= 1e-5 and np.abs(b - ref).max() <= 1e-4
  untie_again = load_target(str(tmp_path), with_tokenizer=False, untie_lm_head=True)
  assert jax.tree.structure(untie_again.params) != jax.tree.structure(tied.params)  # scanned layers untie too
  c = base_config()
  assert decoding_load_options(c) == dict(scan_layers=False, untie_lm_head=jax.devices()[0].platform == "cpu")
  c.generate.untie_lm_head = "false"
  assert decoding_load_options(c)["untie_lm_head"] is False
  c.generate.untie_lm_head = "sometimes"
  with pytest.raises(ValueError, match="config.generate.untie_lm_head='sometimes'"):
    decoding_load_options(c)

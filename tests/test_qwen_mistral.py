"""Qwen2/2.5 (qkv bias, tied or untied), Qwen3 (per-head q/k RMSNorm, explicit head_dim) and Mistral (with and
without a sliding window shorter than the sequence) against transformers' PyTorch models on tiny random checkpoints
made by transformers itself: logits, greedy generation, cached decoding and tree verification."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_hf import VARIANTS, VOCAB, hf_logits, tiny_hf_model, write_tiny_gguf

torch = pytest.importorskip("torch")

SEQ = 40  # longer than mistral-window's sliding window (12)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids):
  """float32 [B, T, V] logits of int32 ids [B, T] (one compile per model and shape)."""
  return model.apply({"params": params}, ids).logits


# The fast tier runs Qwen3 and the windowed Mistral (the new attention pieces); the slow tier every variant.
FAST_VARIANTS = ("qwen3", "mistral-window")


@pytest.fixture(scope="module", params=[v if v in FAST_VARIANTS else pytest.param(v, marks=pytest.mark.slow)
                                        for v in sorted(VARIANTS)])
def loaded(request, tmp_path_factory):
  """(variant, transformers model, our Target) of one tiny checkpoint, loaded through the HF-directory path."""
  from vsd_jax.weights import load_target
  directory = tmp_path_factory.mktemp(request.param)
  m = tiny_hf_model(request.param, directory)
  return request.param, m, load_target(str(directory), with_tokenizer=False)


def _ids(seed, shape):
  return np.random.RandomState(seed).randint(3, VOCAB, shape)


def test_qwen_mistral_config_read_from_hf(loaded):
  variant, m, target = loaded
  cfg = target.config
  assert cfg.qkv_bias == variant.startswith("qwen2")
  assert cfg.qk_norm == variant.startswith("qwen3")
  assert cfg.head_dim == (24 if variant == "qwen3" else 16)
  assert cfg.sliding_window == (12 if variant == "mistral-window" else None)
  assert cfg.tie_word_embeddings == m.config.tie_word_embeddings


def test_qwen_mistral_logits_match_transformers(loaded):
  _, m, target = loaded
  ids = _ids(0, (2, SEQ))
  ours = np.asarray(_forward(target.model, target.params, jnp.asarray(ids)))
  ref = hf_logits(m, ids)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_qwen_mistral_sliding_window_changes_logits(tmp_path):
  """The window matters on this sequence: the same weights without it give other logits past the window."""
  m = tiny_hf_model("mistral-window")
  m_full = tiny_hf_model("mistral-window", sliding_window=None)
  ids = _ids(1, (1, SEQ))
  a, b = hf_logits(m, ids), hf_logits(m_full, ids)
  assert np.abs(a[:, :12] - b[:, :12]).max() <= 1e-5 and np.abs(a[:, 13:] - b[:, 13:]).max() > 1e-2


@pytest.mark.slow  # two compiles of the cached call per variant; tree verification covers the cache in the fast tier
def test_qwen_mistral_cached_decoding_equals_full_forward(loaded):
  """Prefill part of the sequence into a cache longer than the window, then one token at a time."""
  from vsd_jax.models.kv_cache import KVCache
  _, _, target = loaded
  ids = jnp.asarray(_ids(2, (1, SEQ)))
  full = np.asarray(_forward(target.model, target.params, ids)[0])
  apply = jax.jit(lambda p, x, c, w: target.model.apply({"params": p}, x, kv_cache=c, write_index=w))
  split = 9
  out = apply(target.params, ids[:, :split], KVCache.zeros(target.config, 1, 64), jnp.asarray([0]))
  cache, steps = out.kv_cache, [np.asarray(out.logits[0])]
  for i in range(split, SEQ):
    out = apply(target.params, ids[:, i:i + 1], cache, jnp.asarray([i]))
    cache = out.kv_cache
    steps.append(np.asarray(out.logits[0]))
  assert np.abs(np.concatenate(steps) - full).max() <= 1e-4


@pytest.mark.slow  # compiles the generation loop (~15 s on 2 cores)
def test_qwen_mistral_greedy_generation_equals_transformers(loaded):
  from vsd_jax.decoding.vanilla import generate
  _, m, target = loaded
  prompt = _ids(3, (1, 6))
  new = 30  # prompt + new tokens run past mistral-window's window
  out = generate(target.model, target.params, jnp.asarray(prompt), jnp.asarray([6]), jax.random.PRNGKey(0), 0.0,
                 max_new_tokens=new, cache_slots=64)
  ours = np.asarray(out.tokens[0]).tolist()
  with torch.no_grad():
    ref = m.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)), max_new_tokens=new,
                     min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
  assert ours == ref[0, 6:].tolist()
  assert len(set(ours)) > 3, ours  # not a degenerate repetition


def test_qwen_mistral_tree_verification_equals_sequential(loaded):
  """tree_forward over a cached prefix gives each node the logits of the prefix + its root-to-node path."""
  from vsd_jax.decoding.tree import tree_forward
  from vsd_jax.models.kv_cache import KVCache
  from vsd_jax.models.masks import ancestor_mask
  _, _, target = loaded
  prefix_len = 20
  seq = _ids(4, (1, prefix_len))
  parents = np.asarray([0, 0, 0, 1, 1, 2, 3, 5, 7])       # node 0 is the root; depths up to 4
  depths = np.zeros(len(parents), int)
  for i in range(1, len(parents)):
    depths[i] = depths[parents[i]] + 1
  tokens = _ids(5, (len(parents),))
  anc = ancestor_mask(jnp.asarray(parents), int(depths.max()))

  @jax.jit
  def verify(params, seq, tokens, depths):  # prefill the prefix into a cache, then the tree over it
    cache = target.model.apply({"params": params}, seq, kv_cache=KVCache.zeros(target.config, 1, 48)).kv_cache
    return tree_forward(target.model, params, cache, tokens, depths, anc[None], jnp.asarray([prefix_len])).logits

  logits = verify(target.params, jnp.asarray(seq), jnp.asarray(tokens[None]), jnp.asarray(depths[None]))
  # Sequential reference: each node's root-to-node path after the prefix, right-padded into one batch (causal: the
  # padding after a path does not change its logits); node i's logits are its path's last row.
  rows = np.zeros((len(parents), prefix_len + int(depths.max()) + 1), np.int64)
  for i in range(len(parents)):
    path, j = [tokens[i]], i
    while j != 0:
      j = parents[j]
      path.insert(0, tokens[j])
    rows[i, :prefix_len], rows[i, prefix_len:prefix_len + len(path)] = seq[0], path
  full = np.asarray(_forward(target.model, target.params, jnp.asarray(rows)))
  want = full[np.arange(len(parents)), prefix_len + depths]
  np.testing.assert_allclose(np.asarray(logits[0]), want, atol=1e-4)


def test_qwen_mistral_unsupported_hf_architecture_is_named(tmp_path):
  import json
  from vsd_jax.weights.hf import open_hf_dir
  (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gemma2", vocab_size=10, hidden_size=8)))
  with pytest.raises(ValueError, match=r"model_type='gemma2' is not a supported architecture; supported: "
                                       r"llama, mistral, qwen2, qwen3"):
    open_hf_dir(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(
      model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
      num_attention_heads=2, use_sliding_window=True)))
  with pytest.raises(ValueError, match="use_sliding_window=true"):
    open_hf_dir(str(tmp_path))


@pytest.mark.parametrize("name,flags", [
    ("qwen3-8b", dict(qk_norm=True, qkv_bias=False, sliding_window=None, head_dim=128, tie_word_embeddings=False)),
    ("qwen3-0.6b", dict(qk_norm=True, head_dim=128, hidden_size=1024, tie_word_embeddings=True)),
    ("qwen2.5-7b-instruct", dict(qkv_bias=True, qk_norm=False, vocab_size=152064, head_dim=128)),
    ("mistral-7b-instruct-v0.3", dict(sliding_window=None, qkv_bias=False, vocab_size=32768)),
    ("deepseek-r1-distill-qwen-7b", dict(qkv_bias=True, rope_theta=10000.0)),
])
def test_qwen_mistral_architecture_table(name, flags):
  """Table entries build a LlamaConfig with their architecture's switches, and hub ids for every entry."""
  from vsd_jax.models.archs import arch
  from vsd_jax.models.llama import LlamaConfig
  from vsd_jax.weights.registry import REGISTRY
  cfg = LlamaConfig(**arch(name))
  assert {k: getattr(cfg, k) for k in flags} == flags
  assert REGISTRY[name][0] == "hub"


@pytest.mark.parametrize("variant,arch", [
    pytest.param("qwen2-tied", "qwen2", marks=pytest.mark.slow), ("qwen2-untied", "qwen2"),
    pytest.param("qwen3", "qwen3", marks=pytest.mark.slow),
    pytest.param("mistral-nowindow", "llama", marks=pytest.mark.slow)])
def test_qwen_mistral_gguf_round_trip(tmp_path, variant, arch):
  """A tiny random GGUF written with the `gguf` package reads back to the safetensors path's parameters and logits."""
  from vsd_jax.weights import load_target
  m = tiny_hf_model(variant, tmp_path / "hf")
  path = write_tiny_gguf(m, tmp_path / "tiny.gguf", arch)
  from_gguf = load_target(path, with_tokenizer=False)
  from_hf = load_target(str(tmp_path / "hf"), with_tokenizer=False)
  g = from_gguf.config
  assert g.rms_norm_eps == pytest.approx(from_hf.config.rms_norm_eps, rel=1e-6)  # GGUF stores it as float32
  assert g == from_hf.config.replace(rms_norm_eps=g.rms_norm_eps)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), from_gguf.params,
               from_hf.params)
  ids = jnp.asarray(_ids(6, (1, 24)))
  a = _forward(from_gguf.model, from_gguf.params, ids)
  np.testing.assert_allclose(np.asarray(a), hf_logits(m, np.asarray(ids)), atol=1e-4)


def test_qwen_mistral_unsupported_gguf_architecture_is_named(tmp_path):
  import gguf
  w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  from vsd_jax.weights.gguf_file import open_gguf
  with pytest.raises(ValueError, match=r"GGUF architecture 'phi3' is not supported; supported: llama, qwen2, qwen3"):
    open_gguf(str(tmp_path / "phi.gguf"))


# Parameter counts on the models' hub cards (billions), against the table's architectures (tied embeddings counted
# once): a wrong width, depth, head_dim, vocabulary or tie flag moves them by more than 1%.
PUBLISHED_PARAMS = {"qwen3-0.6b": 0.6, "qwen3-8b": 8.2, "qwen3-32b": 32.8, "qwen2.5-0.5b-instruct": 0.49,
                    "qwen2.5-7b-instruct": 7.61, "qwen2.5-72b-instruct": 72.7, "mistral-7b-instruct-v0.3": 7.25,
                    "deepseek-r1-distill-llama-8b": 8.03, "deepseek-r1-distill-qwen-7b": 7.62}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_qwen_mistral_table_matches_published_parameter_counts(name):
  import flax.linen as nn
  from vsd_jax.models.archs import arch
  from vsd_jax.models.llama import LlamaConfig, LlamaForCausalLM
  model = LlamaForCausalLM(LlamaConfig(**arch(name)))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) / 1e9
  assert count == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01 if PUBLISHED_PARAMS[name] > 1 else 0.05), count


def test_qwen_mistral_enable_thinking_switch_and_cache_key():
  """config.data.enable_thinking reaches Qwen3's template (off: an empty think block closes the generation prompt)
  and the response cache's key; a template without the switch gets neither (its prompts and keys as before)."""
  import types
  from vsd_jax.config_base import base_config
  from vsd_jax.data.chat import VICUNA_TEMPLATE, prompt_encoder
  from vsd_jax.models.llama import LlamaConfig
  from vsd_jax.weights.tiny_qwen3 import make_tokenizer
  target = types.SimpleNamespace(tokenizer=make_tokenizer(), config=LlamaConfig(eos_token_ids=(258,)))
  encoders = {}
  for thinking in (False, True):
    c = base_config()
    c.data.enable_thinking = thinking
    encoders[thinking] = prompt_encoder(target, c)
  off, on = (encoders[k].encode_user("What is 2+2?") for k in (False, True))
  assert target.tokenizer.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert target.tokenizer.decode(on).endswith("<|im_start|>assistant\n") and off[:len(on)] == on
  assert encoders[False].template_text != encoders[True].template_text
  assert encoders[False].eos_ids == (256, 258)  # <|endoftext|> and <|im_end|>
  c = base_config()
  c.data.chat_template, c.data.enable_thinking = "vicuna", True
  assert prompt_encoder(target, c).template_text == VICUNA_TEMPLATE


def test_qwen3_configs_and_tiny_target(tmp_path):
  """configs/qwen3.py: :8b (default) and :32b carry the table's architecture and a slice; :tiny's generated
  target loads with its tokenizer and the Qwen3 switches; an unknown size names the choices."""
  import importlib.util
  import os
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("qwen3_config", os.path.join(repo, "configs", "qwen3.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.get_config().model.name == "qwen3-8b" and mod.get_config("32b").mesh.slice == "v5p-64"
  assert mod.get_config("32b").model.arch.qk_norm and not mod.get_config().data.enable_thinking
  with pytest.raises(ValueError, match="unknown size; use tiny or one of"):
    mod.get_config("7b")
  from vsd_jax.weights.tiny_qwen3 import make_tiny_qwen3
  from vsd_jax.weights import load_target
  target = load_target(make_tiny_qwen3(str(tmp_path / "tiny_qwen3")))
  assert target.config.qk_norm and target.config.head_dim * target.config.num_heads != target.config.hidden_size
  assert target.tokenizer.eos_token_id in target.config.eos_token_ids

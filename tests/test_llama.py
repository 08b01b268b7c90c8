"""The Flax target against transformers' PyTorch LlamaForCausalLM loaded from the same GGUF file."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import chat_ids
from vsd_jax.decoding.runner import pad_prompts
from vsd_jax.decoding.vanilla import generate

pytestmark = pytest.mark.slow  # the real target and transformers' PyTorch model

PROMPTS = [
    "Write a haiku about the sea.",
    "What is 17 times 23? Show your steps.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clean Python code.",
]


@pytest.fixture(scope="module")
def hf_model(target):
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  m = AutoModelForCausalLM.from_pretrained(os.path.dirname(target.source), gguf_file=os.path.basename(target.source),
                                           dtype=torch.float32)
  return m.eval()


def _hf_logits(hf_model, ids):
  import torch
  with torch.no_grad():
    return hf_model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def forward():
  return jax.jit(lambda model, p, x: model.apply({"params": p}, x).logits, static_argnums=0)


def test_float32_logits_match_transformers(target, hf_model, forward):
  for text in PROMPTS[:3]:
    ids = chat_ids(target.tokenizer, text)
    ours = np.asarray(forward(target.model, target.params, jnp.asarray([ids], jnp.int32)))[0]
    ref = _hf_logits(hf_model, ids)
    assert ours.shape == ref.shape == (len(ids), target.config.vocab_size)
    assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()


def test_unscanned_layers_equal_scanned(target, forward):
  """scan_layers=False (per-layer params) is the same model as the scanned default."""
  from vsd_jax.models.llama import LlamaForCausalLM
  cfg = target.config.replace(scan_layers=False)
  params = {k: v for k, v in target.params.items() if k != "layers"}
  for i in range(cfg.num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda a: a[i], target.params["layers"])
  ids = jnp.asarray([chat_ids(target.tokenizer, PROMPTS[0])], jnp.int32)
  a = forward(target.model, target.params, ids)
  b = forward(LlamaForCausalLM(cfg), params, ids)
  # Same arithmetic, fused differently (one scanned layer body vs 30 unrolled ones): float32 reassociation over
  # 30 layers moves logits of magnitude ~20 by ~1e-4 (measured 1.06e-4); a wrong layer/parameter mapping moves
  # them by O(1). Relative bound: 2e-5 of the largest logit.
  a, b = np.asarray(a), np.asarray(b)
  assert np.abs(a - b).max() <= 2e-5 * np.abs(a).max(), (np.abs(a - b).max(), np.abs(a).max())


# bfloat16 params and compute: logits within BF16_MAX_ABS of float32 transformers, and the next-token
# argmax agrees on >= 90% of positions (bf16 keeps ~3 significant digits; logits reach ~40).
BF16_MAX_ABS = 1.5


def test_bfloat16_within_stated_tolerance(target, hf_model, forward):
  from vsd_jax.weights import load_target
  bf = load_target("smollm2-135m-instruct", dtype="bfloat16", with_tokenizer=False)
  assert jax.tree.leaves(bf.params)[0].dtype == jnp.bfloat16
  ids = chat_ids(target.tokenizer, PROMPTS[1])
  ours = np.asarray(forward(bf.model, bf.params, jnp.asarray([ids], jnp.int32)))[0]
  ref = _hf_logits(hf_model, ids)
  assert np.abs(ours - ref).max() <= BF16_MAX_ABS, np.abs(ours - ref).max()
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_cached_decode_equals_full_forward(target, forward):
  """Prefill part of a sequence into the cache, then feed the rest one token at a time."""
  from vsd_jax.models.kv_cache import KVCache
  ids = chat_ids(target.tokenizer, PROMPTS[2])
  full = np.asarray(forward(target.model, target.params, jnp.asarray([ids], jnp.int32)))[0]
  cache = KVCache.zeros(target.config, 1, 128)
  split = len(ids) - 4
  out = target.model.apply({"params": target.params}, jnp.asarray([ids[:split]]), kv_cache=cache)
  cache, step_logits = out.kv_cache, [np.asarray(out.logits[0])]
  for i in range(split, len(ids)):
    out = target.model.apply({"params": target.params}, jnp.asarray([[ids[i]]]), kv_cache=cache,
                             write_index=jnp.asarray([i]))
    cache = out.kv_cache
    step_logits.append(np.asarray(out.logits[0]))
  assert np.abs(np.concatenate(step_logits) - full).max() <= 1e-3


def _greedy(target, prompts, max_new):
  ids, lens = pad_prompts(prompts, pad_id=2)
  out = generate(target.model, target.params, jnp.asarray(ids), jnp.asarray(lens), jax.random.PRNGKey(0), 0.0,
                 max_new_tokens=max_new, cache_slots=256, eos_ids=(2,), pad_id=2)
  return [np.asarray(out.tokens[i, :int(out.num_new[i])]).tolist() for i in range(len(prompts))], out


def test_greedy_generation_equals_transformers(target, hf_model):
  import torch
  prompts = [chat_ids(target.tokenizer, t) for t in PROMPTS]
  ours = [_greedy(target, [p], 64)[0][0] for p in prompts]
  for p, mine in zip(prompts, ours):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=64, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert mine == ref[0, len(p):].tolist()
  assert any(len(o) == 64 for o in ours), "no prompt ran the full 64 tokens"


def test_batched_generation_equals_single(target):
  prompts = [chat_ids(target.tokenizer, t) for t in PROMPTS]
  assert len({len(p) for p in prompts}) > 1, "prompts must have different lengths"
  batched, out = _greedy(target, prompts, 48)
  for p, b in zip(prompts, batched):
    assert b == _greedy(target, [p], 48)[0][0]
  # One target forward per new token after the prefill's while a row runs; a row that stopped early ends on EOS
  # and keeps padding (pad_id 2) after it, counting no more rounds.
  num_new, rounds, tokens = np.asarray(out.num_new), np.asarray(out.rounds), np.asarray(out.tokens)
  np.testing.assert_array_equal(rounds, num_new - 1)
  assert (num_new < 48).any(), f"no row stopped early: {num_new}"
  for row, n in zip(tokens, num_new):
    assert (n == 48 or row[n - 1] == 2) and (row[n:] == 2).all(), (n, row)


def test_sampling_is_seeded_and_respects_top_p(target):
  prompts = [chat_ids(target.tokenizer, PROMPTS[0])]
  ids, lens = pad_prompts(prompts, pad_id=2)
  run = lambda seed, t, top_p: generate(target.model, target.params, jnp.asarray(ids), jnp.asarray(lens),
                                        jax.random.PRNGKey(seed), t, max_new_tokens=16, cache_slots=128,
                                        eos_ids=(2,), pad_id=2, top_p=top_p).tokens
  a, b, c = run(0, 1.0, 1.0), run(0, 1.0, 1.0), run(1, 1.0, 1.0)
  assert (np.asarray(a) == np.asarray(b)).all()
  assert not (np.asarray(a) == np.asarray(c)).all()
  # top_p -> 0 keeps only the most likely token: sampling becomes greedy.
  assert (np.asarray(run(3, 1.0, 1e-6)) == np.asarray(run(0, 0.0, 1.0))).all()

"""EAGLE-3 draft head and its TTT loss: masks against their definition, decode path == training path,
loss masking, optimisation on a tiny random target, gradient flow."""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tiny_models import init_draft_params
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft, init_draft_cache
from vsd_jax.models.llama import LlamaConfig, LlamaForCausalLM, dot_product_attention
from vsd_jax.methods.eagle3.loss import eagle3_loss, ttt_unroll, validate_vocab_maps
from vsd_jax.models.draft_unroll import chain_slots, shift_left
from vsd_jax.models.features import target_features
from vsd_jax.models.masks import chain_attention_mask, sequence_mask


def ttt_mask(t, step, key_valid):
  """The mask TTT step `step` runs with: step 0 the sequence, later steps one chain per row (R = T) over
  a cache of chain_slots(T, T, depth) slots; here depth = 4."""
  slots = chain_slots(t, t, 4)
  if step == 0:
    return sequence_mask(key_valid, slots)
  b = key_valid.shape[0]
  return chain_attention_mask(jnp.broadcast_to(jnp.arange(1, t + 1), (b, t)), t, 4, step, slots,
                              jnp.full((b,), t, jnp.int32), key_valid)

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4, num_kv_heads=2,
                   head_dim=8, rope_theta=500.0, max_position_embeddings=256)
N_DRAFT = 48
B, T = 2, 12


def vocab_maps(vocab, n, seed=0):
  """A random sorted draft vocabulary of n of the vocab ids, as (t2d bool [V], d2t int [N])."""
  used = np.sort(np.random.default_rng(seed).choice(vocab, n, replace=False))
  t2d = np.zeros(vocab, bool)
  t2d[used] = True
  return jnp.asarray(t2d), jnp.asarray(used - np.arange(n), jnp.int32)


def make_tiny(embed_scale: float = 40.0, ids_seed: int = 0, vocab_seed: int = 0) -> dict:
  """Tiny random target (embedding scaled by embed_scale: larger = more peaked logits), a batch of ids, its
  features and logits, a fresh draft and a random draft vocabulary."""
  model = LlamaForCausalLM(TINY)
  ids = jax.random.randint(jax.random.PRNGKey(ids_seed), (B, T), 0, TINY.vocab_size, jnp.int32)
  tparams = jax.jit(lambda r: nn.unbox(model.init(r, ids)["params"]))(jax.random.PRNGKey(1))
  tparams["embed_tokens"]["embedding"] = tparams["embed_tokens"]["embedding"] * embed_scale
  feats, logits = jax.jit(target_features, static_argnums=0)(model, tparams, ids)
  dcfg = Eagle3Config.from_target(TINY, draft_vocab_size=N_DRAFT)
  emb = tparams["embed_tokens"]["embedding"]
  dparams = init_draft_params(dcfg, jax.random.PRNGKey(2), emb)
  t2d, d2t = vocab_maps(TINY.vocab_size, N_DRAFT, seed=vocab_seed)
  return dict(model=model, tparams=tparams, ids=ids, feats=feats, logits=logits, dcfg=dcfg, draft=Eagle3Draft(dcfg),
              emb=emb, dparams=dparams, t2d=t2d, d2t=d2t)


@pytest.fixture(scope="module")
def tiny():
  """Tiny random target with peaked logits (embedding scaled up), a batch, its features, a draft."""
  return make_tiny()


loss_fn = jax.jit(eagle3_loss, static_argnums=1, static_argnames="num_steps")


def test_config_from_target_and_param_shapes(tiny):
  c = tiny["dcfg"]
  assert c.target_layers == (2, 3, 3) and c.draft_vocab_size == N_DRAFT and c.vocab_size == TINY.vocab_size
  p = tiny["dparams"]
  h = TINY.hidden_size
  chex.assert_shape(p["fc"]["kernel"], (3 * h, h))
  chex.assert_shape(p["midlayer"]["self_attn"]["q_proj"]["kernel"], (2 * h, TINY.num_heads * TINY.head_dim))
  chex.assert_shape(p["midlayer"]["self_attn"]["k_proj"]["kernel"], (2 * h, TINY.num_kv_heads * TINY.head_dim))
  chex.assert_shape(p["lm_head"]["kernel"], (h, N_DRAFT))
  assert "embed_tokens" not in p and "embedding" not in jax.tree_util.keystr(p)
  # Every parameter carries logical axis names.
  boxed = jax.eval_shape(Eagle3Draft(c).init, jax.random.PRNGKey(0), tiny["emb"], tiny["ids"], tiny["feats"])["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  with pytest.raises(ValueError, match="width"):
    Eagle3Draft(c).apply({"params": p}, tiny["emb"], tiny["ids"], tiny["feats"][..., :2 * h])
  with pytest.raises(ValueError, match="unknown field"):
    Eagle3Config.from_target(TINY, draft_vocab=3)


def test_ttt_mask_matches_definition():
  t = 5
  key_valid = np.ones((2, t), bool)
  key_valid[1, :2] = False  # a left-padded row
  for step in range(4):
    got = np.asarray(ttt_mask(t, step, jnp.asarray(key_valid)))
    chex.assert_shape(got, (2, t, 4 * t))
    want = np.zeros_like(got)
    for b in range(2):
      for q in range(t):
        for j in range(t):  # step-0 keys: causal over valid tokens
          want[b, q, j] = j <= q and key_valid[b, j]
        for i in range(1, step + 1):  # one entry per earlier chain step (and this one): slot T + (i-1)*T + q
          want[b, q, t + (i - 1) * t + q] = True
    np.testing.assert_array_equal(got, want)


def test_ttt_attention_equals_brute_force():
  """A step-k query through the one attention kernel == softmax over exactly the allowed keys."""
  b, t, n, kv, d, step = 2, 6, 4, 2, 8, 3
  rng = np.random.default_rng(0)
  q = rng.normal(size=(b, t, n, d)).astype(np.float32)
  ks = rng.normal(size=(4, b, kv, t, d)).astype(np.float32)  # keys of steps 0..3 (the window of depth 4)
  vs = rng.normal(size=(4, b, kv, t, d)).astype(np.float32)
  keys, vals = np.concatenate(list(ks), axis=2), np.concatenate(list(vs), axis=2)
  out = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(vals),
                                         ttt_mask(t, step, jnp.ones((b, t), bool))))
  for bi in range(b):
    for qi in range(t):
      for h in range(n):
        g = h // (n // kv)
        allowed = [(0, j) for j in range(qi + 1)] + [(i, qi) for i in range(1, step + 1)]
        kk = np.stack([ks[i, bi, g, j] for i, j in allowed])
        vv = np.stack([vs[i, bi, g, j] for i, j in allowed])
        s = kk @ q[bi, qi, h] / np.sqrt(d)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[bi, qi, h], (p / p.sum()) @ vv, rtol=1e-5, atol=1e-5)


def test_cached_decode_equals_training_step0(tiny):
  """Step 0 over the whole sequence (causal, no cache) == prefill part into the cache, then one row at a time."""
  draft, p, emb = tiny["draft"], tiny["dparams"], tiny["emb"]
  ids, feats = shift_left(tiny["ids"], 1), tiny["feats"]
  full = draft.apply({"params": p}, emb, ids, feats)
  chex.assert_shape(full.logits, (B, T, N_DRAFT))
  chex.assert_shape(full.hidden, (B, T, TINY.hidden_size))
  assert full.logits.dtype == jnp.float32 and full.kv_cache is None
  step = jax.jit(lambda c, i, f, w: draft.apply({"params": p}, emb, i, f, kv_cache=c, write_index=w))
  cache = init_draft_cache(tiny["dcfg"], B, 32)
  chex.assert_shape(cache.k, (1, B, TINY.num_kv_heads, 32, TINY.head_dim))
  split = 7
  out = draft.apply({"params": p}, emb, ids[:, :split], feats[:, :split], kv_cache=cache)
  logits, hidden, cache = [out.logits], [out.hidden], out.kv_cache
  for i in range(split, T):
    out = step(cache, ids[:, i:i + 1], feats[:, i:i + 1], jnp.full((B,), i, jnp.int32))
    logits.append(out.logits)
    hidden.append(out.hidden)
    cache = out.kv_cache
  np.testing.assert_allclose(np.concatenate(logits, 1), full.logits, atol=1e-5)
  np.testing.assert_allclose(np.concatenate(hidden, 1), full.hidden, atol=1e-5)


def test_ttt_unroll_equals_chained_decoding(tiny):
  """TTT step k at row t == decoding a chain from anchor t: step 0 over the context into the cache, then
  one token per depth (own hidden state fed back, RoPE position t+k), attending to the context slots <= t
  and the chain's own slots."""
  draft, p, emb, ids, feats = tiny["draft"], tiny["dparams"], tiny["emb"], tiny["ids"], tiny["feats"]
  steps = 4
  ttt = np.asarray(ttt_unroll(p, draft, emb, feats, ids, steps))
  slots = T + steps
  ctx = draft.apply({"params": p}, emb, shift_left(ids, 1), feats, kv_cache=init_draft_cache(tiny["dcfg"], B, slots))
  np.testing.assert_allclose(ttt[0], ctx.logits, atol=1e-5)
  decode = jax.jit(lambda c, i, h, pos, m, w: draft.apply({"params": p}, emb, i, h, pos, m, c, w))
  for t in range(T):
    cache, h = ctx.kv_cache, ctx.hidden[:, t:t + 1]
    for k in range(1, steps):
      tok = shift_left(ids, 1 + k)[:, t:t + 1]
      slot = T + k - 1
      mask = (jnp.arange(slots) <= t) | ((jnp.arange(slots) >= T) & (jnp.arange(slots) <= slot))
      out = decode(cache, tok, h, jnp.full((B, 1), t + k, jnp.int32), jnp.broadcast_to(mask, (B, 1, slots)),
                   jnp.full((B,), slot, jnp.int32))
      np.testing.assert_allclose(np.asarray(out.logits[:, 0]), ttt[k][:, t], atol=1e-4, err_msg=f"t={t} k={k}")
      cache, h = out.kv_cache, out.hidden


def _eagle3_loss_by_definition(step_logits, target_logits, loss_mask, t2d, d2t, decay=0.8):
  """The TTT loss one row at a time (VSD_METHOD.md section 6, all tokens valid): step k at row t counts iff
  t+2+k < T, x_{t+2+k} is a loss token and the target's argmax at t+1+k is in the draft vocabulary; it costs the
  soft CE of the draft's step-k logits vs the target's softmax at t+1+k over the draft vocabulary. Steps are
  means over their counted rows, weighted decay**k. -> (loss, [per-step losses])."""
  ids = np.arange(len(d2t)) + np.asarray(d2t)
  steps = []
  for k, lg in enumerate(np.asarray(step_logits, np.float64)):
    ces = []
    for b in range(lg.shape[0]):
      for t in range(lg.shape[1] - 2 - k):
        tl = np.asarray(target_logits[b, t + 1 + k], np.float64)
        if loss_mask[b, t + 2 + k] and np.asarray(t2d)[np.argmax(tl)]:
          p = np.exp(tl[ids] - tl[ids].max())
          logq = lg[b, t] - lg[b, t].max() - np.log(np.sum(np.exp(lg[b, t] - lg[b, t].max())))
          ces.append(-np.sum(p / p.sum() * logq))
    steps.append(np.mean(ces) if ces else 0.0)
  return sum(decay ** k * x for k, x in enumerate(steps)), steps


def test_loss_masking(tiny):
  """Target rows that no counted prediction reads leave the loss unchanged; a counted one changes it."""
  t2d, d2t = tiny["t2d"], tiny["d2t"]
  validate_vocab_maps(t2d, d2t, TINY.vocab_size)
  rng = np.random.default_rng(1)
  logits = np.asarray(rng.normal(size=(B, T, TINY.vocab_size)) * 3, np.float32)
  in_draft, out_draft = np.flatnonzero(np.asarray(t2d)), np.flatnonzero(~np.asarray(t2d))
  loss_mask = np.ones((B, T), np.int32)
  loss_mask[:, 5] = 0                       # token 5 not a loss token: target row 4 unread
  logits[:, 8, out_draft[0]] = 50.0         # target argmax at row 8 outside the draft vocab
  logits[:, 6, in_draft[0]] = logits[:, 6].max() + 1  # row 6: counted (token 7 is a loss token, argmax in vocab)
  # A draft with peaked logits: at init (near-uniform) the loss barely depends on the soft labels.
  dparams = jax.tree.map(lambda x: x, tiny["dparams"])
  dparams["lm_head"]["kernel"] = dparams["lm_head"]["kernel"] * 50.0
  args = lambda lg: (dparams, tiny["draft"], tiny["emb"], tiny["feats"], tiny["ids"], jnp.asarray(lg),
                     jnp.asarray(loss_mask), t2d, d2t)
  base, m = loss_fn(*args(logits), num_steps=3)
  step_logits = jax.jit(ttt_unroll, static_argnums=(1, 5))(dparams, tiny["draft"], tiny["emb"], tiny["feats"],
                                                           tiny["ids"], 3)
  want, want_steps = _eagle3_loss_by_definition(np.asarray(step_logits), logits, loss_mask, t2d, d2t)
  np.testing.assert_allclose(np.asarray(m["step_loss"]), want_steps, rtol=1e-5)
  np.testing.assert_allclose(float(base), want, rtol=1e-5)
  # Rows 0 (x_1 is never predicted) and T-1 (x_T does not exist) are unread too.
  for row in (0, 4, 8, T - 1):
    pert = logits.copy()
    noise = rng.normal(size=pert[:, row].shape) * 5
    if row == 8:
      noise[:, out_draft[0]] = 0.0  # keep the argmax outside the draft vocab
    pert[:, row] += noise
    got, gm = loss_fn(*args(pert), num_steps=3)
    np.testing.assert_allclose(got, base, rtol=1e-6, err_msg=f"row {row}")
    np.testing.assert_allclose(gm["step_loss"], m["step_loss"], rtol=1e-6)
  pert = logits.copy()
  pert[:, 6, in_draft] += rng.normal(size=(B, len(in_draft))) * 2  # the argmax stays in the draft vocab
  got, gm = loss_fn(*args(pert), num_steps=3)
  assert abs(float(got) - float(base)) > 1e-3
  # Row 6 is read by step 0 (draft row 4), step 1 (row 3) and step 2 (row 2): all three change.
  assert np.all(np.abs(np.asarray(gm["step_loss"]) - np.asarray(m["step_loss"])) > 1e-5)


def test_loss_decreases_with_adam(tiny):
  args = (tiny["draft"], tiny["emb"], tiny["feats"], tiny["ids"], tiny["logits"],
          jnp.ones((B, T), jnp.int32).at[:, :3].set(0), tiny["t2d"], tiny["d2t"])
  opt = optax.adam(3e-3)

  @jax.jit
  def update(params, state):
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: eagle3_loss(p, *args, num_steps=7, decay=0.8), has_aux=True)(params)
    upd, state = opt.update(grads, state, params)
    return optax.apply_updates(params, upd), state, loss, metrics

  params = tiny["dparams"]
  state = opt.init(params)
  losses, accs = [], []
  for _ in range(21):
    params, state, loss, metrics = update(params, state)  # loss and metrics of the params before the update
    losses.append(float(loss))
    accs.append(float(metrics["step_acc"][0]))
  assert np.all(np.isfinite(losses))
  chex.assert_shape([metrics["step_loss"], metrics["step_acc"]], (7,))
  assert 1.0 <= float(metrics["tau"]) <= 8.0 and int(metrics["num_tokens"]) > 0
  assert np.allclose(float(metrics["tau"]), 1 + np.cumprod(np.asarray(metrics["step_acc"])).sum())
  assert losses[-1] < 0.8 * losses[0], losses
  assert accs[-1] > accs[0], accs


def test_gradients_reach_draft_only(tiny):
  model = tiny["model"]

  def total(dparams, emb, tparams):
    feats, logits = target_features(model, tparams, tiny["ids"])
    return eagle3_loss(dparams, tiny["draft"], emb, feats, tiny["ids"], logits, jnp.ones((B, T)), tiny["t2d"],
                       tiny["d2t"], num_steps=2)[0]

  gd, ge, gt = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(tiny["dparams"], tiny["emb"], tiny["tparams"])
  for path, g in jax.tree_util.tree_leaves_with_path(gd):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)
  assert not np.any(ge)
  assert all(not np.any(g) for g in jax.tree.leaves(gt))


def test_padding_is_ignored(tiny):
  """Left vs right padding of the same tokens: features, TTT logits and the loss agree on the valid part."""
  pad, n = 3, T - 3
  content = tiny["ids"][0, :n]
  filler = jnp.full((pad,), 7, jnp.int32)
  ids = jnp.stack([jnp.concatenate([content, filler]), jnp.concatenate([filler, content])])
  valid = jnp.stack([jnp.arange(T) < n, jnp.arange(T) >= pad])
  feats, logits = jax.jit(target_features, static_argnums=0)(tiny["model"], tiny["tparams"], ids, valid)
  np.testing.assert_allclose(feats[1, pad:], feats[0, :n], atol=1e-4)
  np.testing.assert_allclose(logits[1, pad:], logits[0, :n], atol=1e-3)
  common = (tiny["dparams"], tiny["draft"], tiny["emb"])
  unroll = jax.jit(ttt_unroll, static_argnums=(1, 5))
  for k, lg in enumerate(unroll(*common, feats, ids, 3, valid)):
    # Rows whose input token x_{t+1+k} exists (past it, the two rows read different filler tokens).
    np.testing.assert_allclose(lg[1, pad:T - 1 - k], lg[0, :n - 1 - k], atol=1e-4, err_msg=f"step {k}")
  lm = valid.astype(jnp.int32)
  loss = lambda r: loss_fn(*common, feats[r:r + 1], ids[r:r + 1], logits[r:r + 1], lm[r:r + 1], tiny["t2d"],
                           tiny["d2t"], num_steps=3, attention_mask=valid[r:r + 1])
  (la, ma), (lb, mb) = loss(0), loss(1)
  assert int(ma["num_tokens"]) == int(mb["num_tokens"]) > 0
  np.testing.assert_allclose(lb, la, rtol=1e-4)


@pytest.mark.slow
def test_real_target_features_and_loss(target):
  """SmolLM2: features are the inputs of layers (2, 15, 27) (transformers' hidden states of the same GGUF); the
  draft at real widths gives the loss of its definition."""
  from tests.conftest import chat_ids
  cfg = target.config
  ids = jnp.asarray([chat_ids(target.tokenizer, "Name three colours.")], jnp.int32)
  feats, logits = jax.jit(target_features, static_argnums=0)(target.model, target.params, ids)
  t = ids.shape[1]
  chex.assert_shape(feats, (1, t, 3 * cfg.hidden_size))
  chex.assert_shape(logits, (1, t, cfg.vocab_size))
  dcfg = Eagle3Config.from_target(cfg, draft_vocab_size=2048)
  assert dcfg.target_layers == (2, 15, 27) and dcfg.hidden_size == 576 and dcfg.num_kv_heads == 3
  emb = target.params["embed_tokens"]["embedding"]
  # transformers' hidden_states[i] is the residual stream entering layer i (index 0: the embedding output).
  torch = pytest.importorskip("torch")
  import os
  from transformers import AutoModelForCausalLM
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(target.source), gguf_file=os.path.basename(target.source),
                                            dtype=torch.float32).eval()
  with torch.no_grad():
    ref = hf(torch.tensor(np.asarray(ids)), output_hidden_states=True).hidden_states
  h = cfg.hidden_size
  for i, layer in enumerate((2, 15, 27)):
    want = ref[layer][0].numpy()
    np.testing.assert_allclose(np.asarray(feats[0, :, i * h:(i + 1) * h]), want, atol=1e-3 * np.abs(want).max(),
                               err_msg=f"layer {layer}")
  t2d, d2t = vocab_maps(cfg.vocab_size, 2048)
  dparams = init_draft_params(dcfg, jax.random.PRNGKey(0), emb)
  draft = Eagle3Draft(dcfg)
  loss, m = loss_fn(dparams, draft, emb, feats, ids, logits, jnp.ones_like(ids), t2d, d2t, num_steps=2)
  step_logits = jax.jit(ttt_unroll, static_argnums=(1, 5))(dparams, draft, emb, feats, ids, 2)
  want, _ = _eagle3_loss_by_definition(np.asarray(step_logits), np.asarray(logits), np.ones(ids.shape), t2d, d2t)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)

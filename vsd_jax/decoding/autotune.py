"""Choose the speculative decoding shape by cost: the chain or tree that commits the most tokens per second here.

    speedup(shape) = tau(shape) * step / round(shape)

tau(shape)    tokens one round commits (accepted drafts + the bonus) at T=0, for this draft on this target. It
              is replayed exactly, not estimated: the target's own greedy continuations of calibration prompts
              fix what greedy verification accepts, so one target pass and one draft pass over those sequences
              give the draft's state at every committed length L, a tree grown from each state gives the
              tokens it would accept there (`accept_lengths`), and the rounds are replayed from the prompt's
              end (L -> L + accepted + 1) exactly as `speculative_generate` would commit them.
round(shape)  one round's device time: the target's verification forward over shape.num_nodes tokens (timed
              on this device at each node count the best candidates need) plus the draft's side (tree
              expansion, acceptance, the draft's update over the committed tokens; timed per shape).
step          one vanilla decode step (the target over one token) on the same cache: the unit.

EAGLE-2 ranks the nodes inside a tree by the draft's confidence; this chooses the tree itself (chain or tree,
depth, branching, verified tokens) from measured acceptance and measured cost, which is what decides whether
speculative decoding beats vanilla on a device: on a 2-core CPU a 9-node verification costs 1.6 decode steps,
on a GPU about one. The choice, the measured tables and the calibration prompts are cached in a JSON file
(`cache_path`) per device, target weights, draft weights, dtype, precision, layer layout and batch size.
The choice made at T=0 is used at every temperature (tree sampling accepts less than greedy; the ranking of
shapes by cost stays).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vsd_jax.weights.identity import model_id
from vsd_jax.decoding.precision import matmul_precision
from vsd_jax.decoding.runner import bucket, cache_slots, pad_prompts
from vsd_jax.decoding.speculative import Round
from vsd_jax.decoding.tree import TreeConfig, expand_tree, tree_forward
from vsd_jax.decoding.vanilla import generate
from vsd_jax.models.draft_unroll import draft_fn_of, sequence_step
from vsd_jax.models.features import embedding_matrix, fuse_features
from vsd_jax.models.kv_cache import KVCache

CACHE_VERSION = 2   # 2: the draft side timed through speculative.Round (its commit bookkeeping included)

# Candidate shapes per platform: (mode, depth, top_k, verified-token counts). Chains take depth 1..D.
CANDIDATES = {
    "cpu": dict(chain_depths=(1, 2, 3, 4, 5, 6),
                trees=((1, 4, (2, 3, 4)), (2, 2, (3, 4)), (2, 3, (4, 6)), (3, 2, (4, 6)), (3, 3, (6, 8)),
                       (4, 4, (8, 12)), (5, 4, (12, 16)))),
    "accelerator": dict(chain_depths=(2, 3, 4, 5, 6, 7, 8),
                        trees=((5, 8, (16, 24, 32)), (6, 10, (32, 48, 60)), (7, 10, (48, 60, 80)),
                               (8, 10, (60, 80, 96)))),
}


def candidate_shapes(platform: str) -> list:
  """TreeConfigs worth timing on `platform` ('cpu' or an accelerator)."""
  c = CANDIDATES["cpu" if platform == "cpu" else "accelerator"]
  shapes = [TreeConfig(depth=d, top_k=1, total_tokens=d, mode="chain") for d in c["chain_depths"]]
  for depth, k, totals in c["trees"]:
    shapes += [TreeConfig(depth=depth, top_k=k, total_tokens=n, mode="tree") for n in totals]
  return shapes


def shape_name(s: TreeConfig) -> str:
  return f"chain d{s.depth}" if s.mode == "chain" else f"tree d{s.depth} k{s.top_k} n{s.total_tokens}"


# ----------------------------------------------------------------------------------------------------------
# Acceptance: exact T=0 replay on the target's greedy continuations.


@dataclasses.dataclass
class Calibration:
  """Sequences = prompt + the target's greedy continuation (EOS included when produced)."""
  ids: np.ndarray          # int32 [B, W] right-padded
  prompt_lens: np.ndarray  # int32 [B]
  lens: np.ndarray         # int32 [B] prompt + continuation


def greedy_continuations(target, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids=(), pad_id=0,
                         precision=None, multiple: int = 64) -> Calibration:
  """The target's T=0 continuations of `prompts` (one batched vanilla.generate call)."""
  ids, lens = pad_prompts(prompts, pad_id, multiple)
  slots = cache_slots(ids.shape[1], max_new_tokens)
  out = jax.device_get(generate(target.model, target.params, jnp.asarray(ids), jnp.asarray(lens),
                                jax.random.PRNGKey(0), 0.0, max_new_tokens=max_new_tokens, cache_slots=slots,
                                eos_ids=tuple(eos_ids), pad_id=pad_id, precision=precision))
  width = bucket(int(lens.max()) + max_new_tokens, multiple)
  seqs = np.full((len(prompts), width), pad_id, np.int32)
  total = np.zeros(len(prompts), np.int32)
  for b, p in enumerate(prompts):
    n = int(out.num_new[b])
    seqs[b, :len(p)] = p
    seqs[b, len(p):len(p) + n] = out.tokens[b, :n]
    total[b] = len(p) + n
  return Calibration(seqs, lens, total)


def sequence_states(target_model, target_params, draft_model, draft_params, ids, lens, num_slots):
  """The draft over whole sequences, as its decoding prefill runs it (`draft_unroll.sequence_step`: row j reads the
  target's features of position j and token j+1). ids: int32 [B, W]; lens: int32 [B]
  -> (logits [B, W, Vd], hidden [B, W, H], draft cache of num_slots slots)."""
  out = target_model.apply({"params": target_params}, ids, hidden_layers=target_model.cfg.eagle3_layers,
                           return_logits=False)
  valid = jnp.arange(ids.shape[1])[None, :] < lens[:, None]
  step0 = sequence_step(draft_model, draft_params, embedding_matrix(target_params), fuse_features(out.hidden_states),
                        ids, valid, num_slots)
  return step0.logits, step0.hidden, step0.kv_cache


def trees_at_roots(shape: TreeConfig, draft_model, draft_params, embed, d2t, seq, seq_len, roots, logits, hidden,
                   cache):
  """The tree `expand_tree` grows at each committed length in `roots` of one calibration sequence, and which of its
  nodes hold the target's greedy continuation there: (Tree with R rows, correct bool [R, T]). Arguments as
  `accept_lengths`."""
  r = roots.shape[0]
  rows = lambda a: jnp.broadcast_to(a, a.shape[:1] + (r,) + a.shape[2:])  # noqa: E731
  carry = KVCache(rows(cache.k), rows(cache.v))
  draft_fn = draft_fn_of(draft_model, draft_params, embed)
  tree, _ = expand_tree(shape, draft_fn, carry, d2t, seq[roots], logits[roots - 1], hidden[roots - 1], roots)
  pos = roots[:, None] + tree.depths                                          # [R, T]
  return tree, (tree.tokens == seq[jnp.minimum(pos, seq.shape[0] - 1)]) & (pos < seq_len)


def accept_lengths(shape: TreeConfig, totals: Sequence[int], draft_model, draft_params, embed, d2t, seq, seq_len,
                   roots, logits, hidden, cache):
  """Draft tokens greedy verification accepts when a round starts at each committed length in `roots`.

  shape: a tree TreeConfig (chain: top_k=1, total_tokens=depth) grown with total_tokens = max(totals); its best
    n nodes by score are the tree of total_tokens = n (reranking is a top-n, so the trees nest).
  seq: int32 [W] one calibration sequence (its first seq_len tokens are real); roots: int32 [R] committed lengths
    L (the round's root is seq[L]); logits [W, Vd] / hidden [W, H]: the draft over the sequence; cache: its
    draft cache [1, 1, KV, S, D].
  Returns int32 [len(totals), R]: per n, the depth of the deepest node on the target's greedy path.
  """
  tree, correct = trees_at_roots(shape, draft_model, draft_params, embed, d2t, seq, seq_len, roots, logits, hidden,
                                 cache)
  correct = correct.at[:, 0].set(True)
  path_ok = jnp.all(~tree.ancestors | correct[:, None, :], axis=2)            # [R, T]
  scores = jnp.where(jnp.arange(tree.scores.shape[1])[None] == 0, jnp.inf, tree.scores)
  rank = jnp.argsort(jnp.argsort(-scores, axis=1), axis=1)                    # root 0, then by score
  return jnp.stack([jnp.max(jnp.where(path_ok & (rank <= n), tree.depths, 0), axis=1) for n in totals])


def replay_visits(accepted: np.ndarray, prompt_len: int, seq_len: int) -> list:
  """The committed lengths L - prompt_len at which `speculative_generate` starts its verification rounds on one
  sequence (new tokens = seq_len - prompt_len, the first from the prefill) when a round at committed length L accepts
  accepted[L - prompt_len] draft tokens."""
  length, visits = prompt_len, []
  while length < seq_len - 1:  # the root at `length` is already a new token; the last one ends decoding
    visits.append(length - prompt_len)
    length += int(accepted[length - prompt_len]) + 1
  return visits


def replay_rounds(accepted: np.ndarray, prompt_len: int, seq_len: int) -> int:
  """Verification rounds `speculative_generate` spends on one sequence (see `replay_visits`)."""
  return len(replay_visits(accepted, prompt_len, seq_len))


def measure_tau(target, draft_model, draft_params, d2t, calib: Calibration, shapes: Sequence[TreeConfig],
                precision=None) -> dict:
  """{shape_name: dict(tau, rounds [per sequence])} from the exact T=0 replay over every calibration sequence
  (see the module doc); tau = all new tokens / all rounds, as `evaluate` reports it."""
  groups: dict = {}  # one expansion per (mode, depth, top_k); chains share the deepest
  for s in shapes:
    key = ("chain", 1) if s.mode == "chain" else ("tree", s.depth, s.top_k)
    groups.setdefault(key, []).append(s)
  expansions = []
  for key, ss in groups.items():
    if key[0] == "chain":
      d = max(s.depth for s in ss)
      expansions.append((TreeConfig(depth=d, top_k=1, total_tokens=d), [d], [(s, s.depth) for s in ss]))
    else:
      n = max(s.total_tokens for s in ss)
      expansions.append((TreeConfig(depth=key[1], top_k=key[2], total_tokens=n),
                         sorted({s.total_tokens for s in ss}), [(s, None) for s in ss]))
  embed = embedding_matrix(target.params)
  w = calib.ids.shape[1]
  max_depth = max(e[0].depth for e in expansions)
  slots = w + max(e[0].scratch_slots for e in expansions) + max_depth + 2
  with matmul_precision(precision):
    states = jax.jit(sequence_states, static_argnums=(0, 2, 6))(
        target.model, target.params, draft_model, draft_params, jnp.asarray(calib.ids), jnp.asarray(calib.lens),
        slots)
  rows = int(np.max(calib.lens - calib.prompt_lens))
  rounds = {shape_name(s): [] for s in shapes}
  for exp_shape, totals, members in expansions:
    fn = jax.jit(lambda *a, _s=exp_shape, _t=tuple(totals): accept_lengths(_s, _t, draft_model, *a))
    for b in range(calib.ids.shape[0]):
      p, n = int(calib.prompt_lens[b]), int(calib.lens[b])
      roots = np.minimum(p + np.arange(rows), n - 1).astype(np.int32)  # fixed row count: one compile
      with matmul_precision(precision):
        acc = np.asarray(fn(draft_params, embed, d2t, jnp.asarray(calib.ids[b]), n, jnp.asarray(roots),
                            states[0][b], states[1][b], KVCache(states[2].k[:, b:b + 1], states[2].v[:, b:b + 1])))
      for s, cap in members:
        a = acc[totals.index(s.total_tokens)] if cap is None else np.minimum(acc[0], cap)
        rounds[shape_name(s)].append(replay_rounds(a, p, n))
  new = int(np.sum(calib.lens - calib.prompt_lens))
  return {k: dict(tau=new / max(1, sum(r)), rounds=r) for k, r in rounds.items()}


# ----------------------------------------------------------------------------------------------------------
# Cost: the target's verification forward by node count, and the draft's side of a round, timed here.


def time_interleaved(timers: dict, repeats: int) -> dict:
  """{name: best seconds} of timers {name: (fn, args)}: every one called once first (compilation), then `repeats`
  rounds that call each once in turn, so a burst of load from elsewhere lands on all of them, not on one."""
  for fn, args in timers.values():
    jax.block_until_ready(fn(*args))
  best = {k: float("inf") for k in timers}
  for _ in range(repeats):
    for k, (fn, args) in timers.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[k] = min(best[k], time.perf_counter() - t0)
  return best


def _threaded(f, cache, *args):
  """A call of the jitted f(cache, *args) -> (outputs, cache) that donates its cache and keeps the returned one
  for the next call, as the decoding loop updates its caches in place (no copy of the cache per call)."""
  state = [cache]

  def call():
    out, state[0] = f(state[0], *args)
    return out
  return call, ()


def verify_timer(target, nodes: int, batch: int, context: int, num_slots: int, precision=None):
  """(fn, args): the target's forward over `nodes` tokens per row on a cache holding `context` tokens, i.e. the
  verification of a `nodes`-node chain with the decoding loop's feature outputs (nodes=1 without them: the
  vanilla decode step). The cache is updated in place, as in the loops."""
  layers = target.config.eagle3_layers if nodes > 1 else ()

  def fwd(cache, params, tokens, length):
    with matmul_precision(precision):
      t = tokens.shape[1]
      depths = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
      anc = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
      out = tree_forward(target.model, params, cache, tokens, depths, anc, length, hidden_layers=layers)
      return (out.logits, out.hidden_states), out.kv_cache

  return _threaded(jax.jit(fwd, donate_argnums=0), KVCache.zeros(target.config, batch, num_slots), target.params,
                   jnp.zeros((batch, nodes), jnp.int32), jnp.full((batch,), context, jnp.int32))


def time_verify(target, nodes: int, batch: int, context: int, num_slots: int, repeats: int = 5,
                precision=None) -> float:
  """Seconds (best of `repeats`) of `verify_timer`'s forward."""
  return time_interleaved({0: verify_timer(target, nodes, batch, context, num_slots, precision)}, repeats)[0]


def draft_side_timer(target, draft_model, draft_params, d2t, shape: TreeConfig, batch: int, context: int,
                     num_slots: int, precision=None):
  """(fn, args): a round's work other than the target's forward, as `speculative.Round` does it: expansion, greedy
  acceptance over target logits of the tree's nodes, the committed tokens' bookkeeping, and the draft over depth + 1
  committed tokens (its cache updated in place)."""
  h, vocab, t = target.config.hidden_size, target.config.vocab_size, shape.num_nodes
  layers = len(target.config.eagle3_layers)
  r = Round(target.model, draft_model, shape, max_new_tokens=1 << 20)

  def side(dcache, dp, root, root_logits, root_hidden, length, tlogits, hidden_states):
    with matmul_precision(precision):
      tree, dcache = r.expand(target.params, dp, d2t, dcache, root, root_logits, root_hidden, length, None)
      path, m, bonus = r.accept(tree, tlogits, None, d2t)
      tokens = jnp.zeros((batch, 2 * r.width), jnp.int32)
      new, tokens, _, _, _ = r.commit(tokens, jnp.ones((batch,), jnp.int32), jnp.zeros((batch,), bool), tree.tokens,
                                      path, m, bonus)
      dout = r.draft_update(target.params, dp, dcache, new, hidden_states, path, length)
      return (dout.logits[:, 0], tokens, m, bonus), dout.kv_cache

  rng = np.random.default_rng(0)
  return _threaded(jax.jit(side, donate_argnums=0), KVCache.zeros(draft_model.cfg.layer_config, batch, num_slots),
                   draft_params, jnp.zeros((batch,), jnp.int32),
                   jnp.asarray(rng.normal(size=(batch, d2t.shape[0])), jnp.float32),
                   jnp.zeros((batch, h), jnp.float32), jnp.full((batch,), context, jnp.int32),
                   jnp.asarray(rng.normal(size=(batch, t, vocab)), jnp.float32),
                   jnp.zeros((layers, batch, t, h), jnp.float32))


def _interp(curve: dict, n: int) -> float:
  """Verification seconds at n nodes from the timed node counts: their lower monotone envelope (a forward over
  more tokens never costs less; a larger time at fewer nodes is timing noise), interpolated linearly."""
  xs = sorted(curve)
  ys = np.minimum.accumulate([curve[x] for x in xs][::-1])[::-1]
  return float(np.interp(n, xs, ys))


@dataclasses.dataclass
class Choice:
  shape: TreeConfig
  predicted_speedup: float
  table: list               # per candidate: name, tau, round_ms, step_ms, speedup, verify_timed
  key: str
  cached: bool = False
  calibration: Optional[dict] = None  # which prompts measured the acceptance (as choose_shape was told), if known

  @property
  def pays(self) -> bool:
    """Whether speculating with this shape is predicted faster than vanilla decoding on this device."""
    return not self.predicted_speedup < 1.0

  def describe(self) -> str:
    src = "cached" if self.cached else "measured"
    slower = "" if self.pays else " (no candidate shape is predicted faster than vanilla decoding here)"
    return (f"decoding shape ({src}): {shape_name(self.shape)}, predicted speedup {self.predicted_speedup:.2f}x "
            f"over vanilla on this device{slower}")


def draft_identity(draft_dir: str) -> str:
  """sha1 (12 hex) of the draft's weights and config files."""
  hsh = hashlib.sha1()
  for name in ("draft_config.json", "draft.msgpack", "vocab.npz"):
    path = os.path.join(draft_dir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          hsh.update(chunk)
  return hsh.hexdigest()[:12]


def cache_key(target, draft_dir: str, batch: int, precision=None) -> str:
  dev = jax.devices()[0]
  return "|".join([f"v{CACHE_VERSION}", dev.platform, getattr(dev, "device_kind", "?"), f"x{jax.device_count()}",
                   model_id(target), f"scan={target.config.scan_layers}", f"tied={target.config.tie_word_embeddings}",
                   f"draft={draft_identity(draft_dir)}", f"batch={batch}", f"precision={precision}"])


def default_cache_path() -> str:
  root = os.environ.get("VSD_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vsd_jax")
  return os.path.join(root, "decoding_shapes.json")


def _read_cache(path):
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    print(f"autotune: ignoring unreadable cache {path} ({e}); it will be rewritten", file=sys.stderr)
    return {}


def choose_shape(target, draft_model, draft_params, d2t, draft_dir: str, calib_prompts: Sequence[Sequence[int]],
                 *, eos_ids=(), pad_id: int = 0, batch: int = 1, max_new_tokens: int = 96,
                 shapes: Optional[Sequence[TreeConfig]] = None, precision=None, cache_path: Optional[str] = None,
                 retune: bool = False, exact_verify_top: int = 4, repeats: int = 10,
                 calibration: Optional[dict] = None, log=None) -> Choice:
  """The candidate shape with the highest predicted speedup over vanilla on this device (see the module doc).

  calib_prompts: token-id prompts whose greedy continuations (max_new_tokens each) give the acceptance; keep
    them apart from the prompts you evaluate on. batch: the decoding batch size the costs are timed at.
  shapes: candidates (default `candidate_shapes(platform)`). Verification is timed at node counts 1, 2, 4, 8,
    16, ... up to the largest candidate and interpolated, then timed exactly at the node counts of the best
    `exact_verify_top` candidates before the final ranking.
  cache_path: JSON cache (default `default_cache_path()`; '' disables it); retune: measure even when cached.
  calibration: a description of the calibration prompts (e.g. their source and ids), kept with the choice in the
    cache and returned as Choice.calibration, so a cached choice still says what measured it.
  """
  log = log or (lambda msg: print(msg, file=sys.stderr))
  d2t = jnp.asarray(d2t)
  key = cache_key(target, draft_dir, batch, precision)
  path = default_cache_path() if cache_path is None else cache_path
  if path and not retune:
    hit = _read_cache(path).get(key)
    if hit:
      s = hit["shape"]
      return Choice(TreeConfig(**s), hit["predicted_speedup"], hit["table"], key, cached=True,
                    calibration=hit.get("calibration"))
  if not calib_prompts:
    raise ValueError("choose_shape needs calibration prompts (token ids) to measure the draft's acceptance; "
                     "pass a few prompts apart from the ones you evaluate, or give the tree shape explicitly")
  platform = jax.devices()[0].platform
  shapes = list(shapes or candidate_shapes(platform))
  t0 = time.perf_counter()
  log(f"autotune: the target's greedy continuations of {len(calib_prompts)} calibration prompts ...")
  calib = greedy_continuations(target, calib_prompts, max_new_tokens, eos_ids, pad_id, precision)
  log("autotune: replaying acceptance for " + ", ".join(shape_name(s) for s in shapes) + " ...")
  tau = {k: v["tau"] for k, v in measure_tau(target, draft_model, draft_params, d2t, calib, shapes, precision).items()}

  context = int(np.mean(calib.lens))
  max_nodes = max(s.num_nodes for s in shapes)
  num_slots = cache_slots(int(calib.ids.shape[1]), max_new_tokens, max_nodes + 2 * max(s.scratch_slots for s in shapes))
  coarse = sorted({1} | {n for n in (2, 4, 8, 16, 32, 64, 128) if n < max_nodes} | {max_nodes})
  log(f"autotune: timing the target's verification at {coarse} nodes and each shape's draft side (batch {batch}) ...")
  timers = {("verify", n): verify_timer(target, n, batch, context, num_slots, precision) for n in coarse}
  timers.update({("side", shape_name(s)): draft_side_timer(target, draft_model, draft_params, d2t, s, batch, context,
                                                           num_slots, precision) for s in shapes})
  times = time_interleaved(timers, repeats)
  verify = {n: times[("verify", n)] for n in coarse}
  side = {shape_name(s): times[("side", shape_name(s))] for s in shapes}
  step = _interp(verify, 1)

  def predict(s):
    return tau[shape_name(s)] * step / (_interp(verify, s.num_nodes) + side[shape_name(s)])

  best = sorted(shapes, key=predict, reverse=True)[:exact_verify_top]
  exact = sorted({s.num_nodes for s in best} - set(verify))
  if exact:  # timed again with their neighbours in the curve, interleaved
    near = sorted({1} | set(exact) | {max([c for c in coarse if c < n], default=1) for n in exact}
                  | {min([c for c in coarse if c > n], default=max_nodes) for n in exact})
    again = time_interleaved({n: verify_timer(target, n, batch, context, num_slots, precision) for n in near},
                             repeats)
    verify = {n: min(verify.get(n, float("inf")), t) for n, t in {**verify, **again}.items()}
    step = _interp(verify, 1)
  table = []
  for s in shapes:
    rnd = _interp(verify, s.num_nodes) + side[shape_name(s)]
    table.append(dict(name=shape_name(s), shape=dataclasses.asdict(s), tau=tau[shape_name(s)], round_ms=rnd * 1e3,
                      verify_ms=_interp(verify, s.num_nodes) * 1e3, draft_side_ms=side[shape_name(s)] * 1e3,
                      step_ms=step * 1e3, round_steps=rnd / step, speedup=tau[shape_name(s)] * step / rnd,
                      verify_timed=s.num_nodes in verify))
  table.sort(key=lambda r: -r["speedup"])
  top = table[0]
  measured = dict(calibration or {}, prompts=len(calib_prompts), max_new_tokens=max_new_tokens,
                  tokens=int(np.sum(calib.lens - calib.prompt_lens)))
  choice = Choice(TreeConfig(**top["shape"]), top["speedup"], table, key, calibration=measured)
  log(f"autotune: {len(shapes)} shapes in {time.perf_counter() - t0:.0f} s; " + choice.describe())
  if path:
    entries = _read_cache(path)
    entries[key] = dict(shape=top["shape"], predicted_speedup=top["speedup"], table=table,
                        verify_ms={str(k): v * 1e3 for k, v in verify.items()},
                        calibration=measured,
                        date=time.strftime("%Y-%m-%d %H:%M"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(entries, f, indent=1)
    os.replace(tmp, path)
  return choice


def format_table(table: list) -> str:
  lines = ["| shape | tau (T=0 replay) | verify ms | draft side ms | round ms | in decode steps | predicted speedup |",
           "|---|---|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['name']} | {r['tau']:.2f} | {r['verify_ms']:.1f} | {r['draft_side_ms']:.1f} | "
                 f"{r['round_ms']:.1f} | {r['round_steps']:.2f} | "
                 f"{r['speedup']:.2f}x{'' if r['verify_timed'] else ' (interpolated)'} |")
  return "\n".join(lines)

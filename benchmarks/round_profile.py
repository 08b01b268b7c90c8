"""Where a speculative round's time goes on this device, part by part, at batch 1 and at a batch > 1.

  # the embedded default target and the shipped draft (real prompts, so real acceptance); CPU or GPU
  python benchmarks/round_profile.py --draft ../shared/drafts/smollm2-eagle3-gpu-1500/draft --batches 1,4 \
      --tree_depth 4 --top_k 4 --total_tokens 8 --output runs/round_profile/cpu_tree.json
  # the same with scanned target layers (--scan_layers 1: training's layout; the default 0 is decoding's)
  # random weights in the Llama-3.1-8B shape in bfloat16 with a random draft: a round's cost in target
  # decode steps for a GPU projection (the cost does not depend on the weights; tau here means nothing)
  python benchmarks/round_profile.py --random_target llama-3.1-8b-instruct --tree_depth 6 --top_k 10 \
      --total_tokens 60 --batches 1,4
  # a rehearsal in seconds of compute: 4 layers in the SmolLM2 shape, 16 new tokens
  python benchmarks/round_profile.py --random_target smollm2-135m-instruct --layers 4 --dtype float32 \
      --draft_vocab 8192 --batches 1,2 --max_new_tokens 16 --nodes 1,8 --repeats 3

`speculative_generate` is one jitted while_loop, so its parts cannot be timed from outside. It is built from
`decoding.speculative.Round` (its prefill and round, and the parts a round is made of: expand, verify, accept,
kv_update, commit, draft_update), and the public `speculative_prefill` / `speculative_round` run exactly those; this
script times that same code, not a copy. It times each part jitted alone on the state after prefill and
--warm_rounds rounds. Each time is the best of --repeats, ended by block_until_ready. The caches that the
loop updates in place are donated, so no part pays for a cache copy the loop does not make:

  expansion      expand_tree as a whole. Per depth level d >= 2: the draft forward over the depth d-1
                 frontier, alone and with the children's log-softmax + top-k. The rest is the root top-k,
                 the frontier choice, the rerank and the tree masks.
  verification   tree_forward over this round's tree, and over chains of --nodes nodes (cost by node count)
  acceptance     the verify rule (greedy at T=0)
  kv update      gather_slots: the accepted path compacted in the target cache
  draft update   the draft over the committed tokens, with the target's features of them; its lm_head
                 matmul alone over those D+1 rows and over the 1 row the next round reads
  bookkeeping    committed tokens, EOS, counters
  round          the rebuilt round jitted as one program; the round inside speculative_generate's loop,
                 (time at --max_new_tokens - time at a quarter of it) / (loop iterations between them);
                 the loop alone (a while_loop carrying the same state and doing nothing): its cost per
                 iteration
  decode step    vanilla decoding's step alone, and inside vanilla.generate's loop (the table's unit)
  per call       prefill (target + draft), and the target's prefill with and without logits at every
                 prompt position; the loop fit's fixed cost; on the host, the dispatch of the jitted call
                 (Python time until it returns), the fetch of its outputs, and the padding and transfer of
                 the prompts. Nothing runs on the host between rounds.

Prompts: the first --bench prompts with the chat template for a real target (random ids when the file is
missing), --prompt_len random ids for a random target. No EOS stops a row, so every loop runs its full length.
Prints a Markdown table (ms, and target decode steps) and one JSON line (also written to --output).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vsd_jax.config_base import DEFAULT_DATA_ROOT, base_config  # noqa: E402
from vsd_jax.data.chat import prompt_encoder  # noqa: E402
from vsd_jax.data.prompt_file import read_prompt_file  # noqa: E402
from vsd_jax.decoding.precision import PRECISIONS, matmul_precision  # noqa: E402
from vsd_jax.decoding.runner import cache_slots, pad_prompts  # noqa: E402
from vsd_jax.decoding.speculative import (Round, required_slots, speculative_generate, speculative_prefill,  # noqa: E402
                                          speculative_round)
from vsd_jax.decoding.tree import SHAPE_DEFAULTS, TreeConfig, expand_tree, tree_forward  # noqa: E402
from vsd_jax.decoding.vanilla import generate  # noqa: E402
from vsd_jax.models.archs import arch  # noqa: E402
from vsd_jax.models.draft_unroll import draft_fn_of  # noqa: E402
from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft  # noqa: E402
from vsd_jax.models.features import embedding_matrix  # noqa: E402
from vsd_jax.models.kv_cache import KVCache  # noqa: E402
from vsd_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vsd_jax.models.masks import chain_attention_mask, decode_mask  # noqa: E402
from vsd_jax.weights import load_target  # noqa: E402
from vsd_jax.weights.draft_io import load_draft  # noqa: E402
from vsd_jax.weights.registry import untie_on_this_device  # noqa: E402


def expand_recorded(r: Round, tp, dp, d2t, dcache, root, root_logits, root_hidden, length, key):
  """Round.expand -> (tree, dcache, the arguments of each draft forward it made, one per depth level >= 2)."""
  inner = draft_fn_of(r.draft_model, dp, embedding_matrix(tp))
  calls = []

  def recording(*a):
    calls.append(a)
    return inner(*a)
  tree, dcache = expand_tree(r.tree_cfg, recording, dcache, d2t, root, root_logits, root_hidden, length, key,
                             r.temperature, r.top_p)
  if r.tree_cfg.mode == "chain":  # its forwards run inside unroll_chain's scan: rebuild their arguments
    s, depth = dcache.num_slots, r.tree_cfg.depth
    calls = [(dcache, root[:, None], root_hidden[:, None], (length - 1)[:, None] + i,
              chain_attention_mask(length, 1, depth, i, s, length), length + i - 1) for i in range(1, depth)]
  return tree, dcache, calls


def select(r: Round, logits):
  """A level's choice of children from its draft logits [B, k, Vd] (what expand_tree does with them)."""
  if r.tree_cfg.mode == "chain":
    return jnp.argmax(logits, -1)
  return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), r.tree_cfg.top_k)


def copy(tree):
  """Fresh device copies (the inputs a donating call consumes)."""
  return jax.block_until_ready(jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, tree))


def best_ms(fn, make_args, repeats: int) -> dict:
  """Wall ms of fn(*make_args()), first call (compilation) excluded; make_args runs outside the timing."""
  jax.block_until_ready(fn(*make_args()))
  times = []
  for _ in range(repeats):
    args = make_args()
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1000)
  return dict(best=min(times), median=statistics.median(times))


def loop_fit(call, n1: int, n2: int, repeats: int) -> dict:
  """call(n) -> (output, loop iterations). Per-iteration ms from two loop lengths, and the fixed part."""
  t, iters = {}, {}
  for n in (n1, n2):
    out, _ = call(n)
    jax.block_until_ready(out)  # compile
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      out, it = call(n)
      jax.block_until_ready(out)
      best = min(best, (time.perf_counter() - t0) * 1000)
    t[n], iters[n] = best, int(it)
  per = (t[n2] - t[n1]) / max(iters[n2] - iters[n1], 1)
  return dict(per_iteration=per, fixed=t[n1] - iters[n1] * per, ms=t, iterations=iters)


def random_target(args):
  """-> (model, params): random weights in the shape of archs.ARCHS[args.random_target], in args.dtype."""
  fields = arch(args.random_target)
  if args.layers:
    fields["num_layers"] = args.layers
  cfg = LlamaConfig(**fields, dtype=args.dtype, param_dtype=args.dtype, scan_layers=bool(args.scan_layers))
  tm = LlamaForCausalLM(cfg)
  tp = jax.jit(lambda r: nn.unbox(tm.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.PRNGKey(args.seed))
  return tm, tp


def random_draft(tm, tp, draft_vocab: int, seed: int):
  """-> (module, params, d2t): a random EAGLE-3 draft for target `tm` over its first draft_vocab ids."""
  dcfg = Eagle3Config.from_target(tm.cfg, draft_vocab_size=min(draft_vocab, tm.cfg.vocab_size))
  dm = Eagle3Draft(dcfg)
  ids, feats = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, 3 * dcfg.hidden_size), dcfg.jnp_dtype)
  dp = jax.jit(lambda r, e: nn.unbox(dm.init(r, e, ids, feats)["params"]))(
      jax.random.PRNGKey(seed + 1), embedding_matrix(tp))
  return dm, dp, jnp.zeros((dcfg.draft_vocab_size,), jnp.int32)  # draft id i = target id i


def prompts_for(args, target, vocab: int, batch: int):
  """Chat prompts of --bench (the real target, when the file is there), else random ids; -> (list, source)."""
  path = os.path.join(args.data_root, "eval", "eagle", args.bench, "question.jsonl")
  if target is not None and target.tokenizer is not None and os.path.isfile(path):
    enc = prompt_encoder(target, base_config())
    items = read_prompt_file(path)
    return [enc.encode_user(items[i % len(items)][1]) for i in range(batch)], f"{args.bench} (chat template)"
  rng = np.random.RandomState(args.seed)
  lens = [max(1, args.prompt_len - 7 * i) for i in range(batch)]  # rows at different lengths
  return [rng.randint(3, vocab, n).tolist() for n in lens], f"random ids, {args.prompt_len} tokens"


def profile_batch(args, tm, tp, dm, dp, d2t, tree_cfg, prompts, rows: dict):
  """Time every part at one batch size; append the table rows; return the figures."""
  b = len(prompts)
  n2 = args.max_new_tokens
  n1 = max(2, n2 // 4)
  ids, lens = pad_prompts(prompts, 0)
  slots = cache_slots(ids.shape[1], n2, required_slots(0, 0, tree_cfg))   # as the decoding engine sizes it
  van_slots = cache_slots(ids.shape[1], n2)
  ids, lens, d2t = jnp.asarray(ids), jnp.asarray(lens), jnp.asarray(d2t)
  key = jax.random.PRNGKey(args.seed)
  r = Round(tm, dm, tree_cfg, n2, temperature=args.temperature)  # speculative_generate's own prefill and round
  reps = args.repeats
  res = dict(batch=b, prompt_width=int(ids.shape[1]), prompt_lens=[int(x) for x in lens], cache_slots=slots,
             vanilla_cache_slots=van_slots)

  # State after prefill and --warm_rounds rounds (the public prefill and round); they commit speculative_generate's
  # tokens (tests/test_round_profile.py), which is checked here on the real prompts too.
  prefill = lambda tp_, dp_, i, ln, k: speculative_prefill(r, tp_, dp_, i, ln, k, cache_slots=slots,  # noqa: E731
                                                           precision=args.precision)
  step = lambda tp_, dp_, d2t_, st: speculative_round(r, tp_, dp_, d2t_, st, precision=args.precision)  # noqa: E731
  s = prefill(tp, dp, ids, lens, key)
  for _ in range(args.warm_rounds):
    s = step(tp, dp, d2t, s)

  def spec(n):
    o = speculative_generate(tm, tp, dm, dp, d2t, ids, lens, key, tree_cfg=tree_cfg, max_new_tokens=n,
                             cache_slots=slots, temperature=args.temperature, precision=args.precision)
    return o, jnp.max(o.rounds)
  long_run, _ = spec(n2)
  k = int(np.min(np.asarray(s["num_new"])))
  same = np.asarray(s["tokens"])[:, :k] == np.asarray(long_run.tokens)[:, :k]
  res["rebuilt_round_matches"] = dict(tokens_compared=int(same.size), equal=int(same.sum()))
  if not same.all():
    print(f"warning: batch {b}: the rebuilt rounds differ from speculative_generate at {int((~same).sum())} of "
          f"{same.size} tokens (near-ties in a differently fused program?)", file=sys.stderr)
  res["tau"] = float(np.sum(np.asarray(long_run.num_new)) / max(1, np.sum(np.asarray(long_run.rounds))))

  # The parts, on copies of the state (caches donated where the loop updates them in place).
  _, k_tree, k_verify = jax.random.split(s["rng"], 3)
  length = s["length"]
  sub = (s["root"], s["root_logits"], s["root_hidden"], length, k_tree)
  expand_rec = jax.jit(lambda *a: expand_recorded(r, *a))
  tree, dcache_x, calls = expand_rec(tp, dp, d2t, copy(s["dcache"]), *sub)
  vout = jax.jit(r.verify)(tp, copy(s["tcache"]), tree, length)
  path, m, bonus = jax.jit(r.accept)(tree, vout.logits, k_verify, d2t)
  new = r.commit(s["tokens"], s["num_new"], s["done"], tree.tokens, path, m, bonus)[0]

  t = {}
  expand = jax.jit(r.expand, donate_argnums=(3,))
  t["expand"] = best_ms(expand, lambda: (tp, dp, d2t, copy(s["dcache"])) + sub, reps)
  embed = embedding_matrix(tp)
  fwd = jax.jit(lambda dp_, e, *a: draft_fn_of(dm, dp_, e)(*a), donate_argnums=(2,))
  fwd_sel = jax.jit(lambda dp_, e, *a: (lambda o: (select(r, o[0]), o[2]))(draft_fn_of(dm, dp_, e)(*a)),
                    donate_argnums=(2,))
  levels = []
  for c in calls:
    levels.append(dict(forward=best_ms(fwd, lambda c=c: (dp, embed, copy(c[0])) + tuple(c[1:]), reps),
                       with_selection=best_ms(fwd_sel, lambda c=c: (dp, embed, copy(c[0])) + tuple(c[1:]), reps),
                       tokens=int(c[1].shape[1])))
  verify = jax.jit(r.verify, donate_argnums=(1,))
  t["verify"] = best_ms(verify, lambda: (tp, copy(s["tcache"]), tree, length), reps)
  t["accept"] = best_ms(jax.jit(r.accept), lambda: (tree, vout.logits, k_verify, d2t), reps)
  t["kv_update"] = best_ms(jax.jit(r.kv_update, donate_argnums=(0,)), lambda: (copy(vout.kv_cache), path, length),
                           reps)
  t["draft_update"] = best_ms(jax.jit(r.draft_update, donate_argnums=(2,)),
                              lambda: (tp, dp, copy(dcache_x), new, vout.hidden_states, path, length), reps)
  t["bookkeeping"] = best_ms(jax.jit(r.commit, donate_argnums=(0,)),
                             lambda: (copy(s["tokens"]), s["num_new"], s["done"], tree.tokens, path, m, bonus), reps)
  t["round_one_program"] = best_ms(step, lambda: (tp, dp, d2t, copy(s)), reps)
  t["prefill"] = best_ms(prefill, lambda: (tp, dp, ids, lens, key), reps)
  # Both prefills compute logits at every prompt position; one row of each is used.
  tpre = jax.jit(lambda tp_, i, logits: tm.apply({"params": tp_}, i, kv_cache=KVCache.zeros(tm.cfg, b, slots),
                                                 hidden_layers=tm.cfg.eagle3_layers, return_logits=logits),
                 static_argnums=(2,))
  t["target_prefill"] = best_ms(tpre, lambda: (tp, ids, True), reps)
  t["target_prefill_no_logits"] = best_ms(tpre, lambda: (tp, ids, False), reps)
  # The draft update's lm_head runs over D+1 rows; the next round reads row m only.
  head = jax.jit(lambda w, h: jnp.einsum("bth,hv->btv", h, w))
  w_head = dp["lm_head"]["kernel"]
  h_rows = jnp.ones((b, r.width, w_head.shape[0]), w_head.dtype)
  t["draft_head_all_rows"] = best_ms(head, lambda: (w_head, h_rows), reps)
  t["draft_head_one_row"] = best_ms(head, lambda: (w_head, h_rows[:, :1]), reps)

  # Verification by node count: chains of N nodes on the same cache and length.
  vchain = jax.jit(lambda tp_, c, tok, dep, anc, ln: tree_forward(tm, tp_, c, tok, dep, anc, ln,
                                                                  hidden_layers=tm.cfg.eagle3_layers),
                   donate_argnums=(1,))
  by_nodes = {}
  for n in args.nodes:
    tok = jnp.resize(tree.tokens, (b, n))
    dep = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    anc = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n))
    by_nodes[n] = best_ms(vchain, lambda: (tp, copy(s["tcache"]), tok, dep, anc, length), reps)["best"]

  # Vanilla decoding's step, alone and in its loop.
  def decode(tp_, cache, last, pos):
    out = tm.apply({"params": tp_}, last[:, None], positions=pos[:, None], attention_mask=decode_mask(pos, slots),
                   kv_cache=cache, write_index=pos)
    return jnp.argmax(out.logits[:, 0], -1), out.kv_cache
  t["decode_step_alone"] = best_ms(jax.jit(decode, donate_argnums=(1,)),
                                   lambda: (tp, copy(s["tcache"]), s["root"], length), reps)

  def van(n):
    o = generate(tm, tp, ids, lens, key, 0.0, max_new_tokens=n, cache_slots=van_slots, precision=args.precision)
    return o, jnp.max(o.rounds)
  vfit = loop_fit(van, n1, n2, max(3, reps // 2))
  sfit = loop_fit(spec, n1, n2, max(3, reps // 2))

  # The loop alone: a while_loop carrying the round's state, doing nothing per iteration.
  def idle(st, iters):
    def body(c):
      i, x = c
      return i + 1, dict(x, length=x["length"] + 1)
    return jax.lax.while_loop(lambda c: (c[0] < iters) & ~jnp.all(c[1]["done"]), body, (jnp.int32(0), st))[1]
  idle = jax.jit(idle)
  lfit = loop_fit(lambda n: (idle(s, jnp.int32(n)), n), 100, 1000, max(3, reps // 2))

  # Host work per call: dispatch (Python until the jitted call returns), fetch, prompt padding and transfer.
  disp, fetch, prep = [], [], []
  for _ in range(max(3, reps // 3)):
    t0 = time.perf_counter()
    o = speculative_generate(tm, tp, dm, dp, d2t, ids, lens, key, tree_cfg=tree_cfg, max_new_tokens=n1,
                             cache_slots=slots, temperature=args.temperature, precision=args.precision)
    disp.append((time.perf_counter() - t0) * 1000)
    jax.block_until_ready(o)
    t0 = time.perf_counter()
    jax.device_get((o.tokens, o.num_new, o.rounds, o.accept_hist))
    fetch.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    i_, l_ = pad_prompts(prompts, 0)
    jax.block_until_ready((jnp.asarray(i_), jnp.asarray(l_), jnp.asarray(np.asarray(d2t))))
    prep.append((time.perf_counter() - t0) * 1000)

  unit = vfit["per_iteration"]
  best = {name: v["best"] for name, v in t.items()}
  parts = ["expand", "verify", "accept", "kv_update", "draft_update", "bookkeeping"]
  sum_parts = sum(best[p] for p in parts)
  lv_sum = sum(lv["with_selection"]["best"] for lv in levels)
  res.update(ms=best, ms_median={name: v["median"] for name, v in t.items()}, levels=levels, verify_by_nodes=by_nodes,
             sum_of_parts=sum_parts, round_in_loop=sfit["per_iteration"], spec_fixed_per_call=sfit["fixed"],
             vanilla_step_in_loop=unit, vanilla_fixed_per_call=vfit["fixed"], loop_overhead=lfit["per_iteration"],
             host=dict(dispatch=min(disp), fetch=min(fetch), prompt_prep=min(prep)),
             fits=dict(spec=sfit, vanilla=vfit, idle_loop=lfit))
  res["round_in_decode_steps"] = sfit["per_iteration"] / unit
  res["projected_speedup_per_round"] = res["tau"] / res["round_in_decode_steps"]

  k = tree_cfg.top_k if tree_cfg.mode == "tree" else 1
  table = [("decode step, vanilla loop (the unit)", unit),
           ("decode step, alone (on speculative's cache)", best["decode_step_alone"]),
           (f"expansion: expand_tree ({tree_cfg.mode}, depth {tree_cfg.depth})", best["expand"])]
  for d, lv in enumerate(levels, start=2):
    table.append((f"  depth {d}: draft forward over {lv['tokens']} frontier tokens", lv["forward"]["best"]))
    table.append((f"  depth {d}: forward + children's {'top-k' if k > 1 else 'argmax'}", lv["with_selection"]["best"]))
  table += [("  rest: root top-k, frontier choice, rerank, tree masks", best["expand"] - lv_sum),
            (f"verification: tree_forward, {tree_cfg.num_nodes} nodes", best["verify"]),
            ("acceptance: " + ("greedy_verify" if args.temperature <= 0 else "sampling rule"), best["accept"]),
            (f"kv update: gather_slots ({tree_cfg.depth + 1} slots x {tm.cfg.num_layers} layers)", best["kv_update"]),
            (f"draft update: draft over {tree_cfg.depth + 1} committed tokens", best["draft_update"]),
            (f"  its lm_head over {tree_cfg.depth + 1} rows (matmul alone; the next round reads 1)",
             best["draft_head_all_rows"]),
            ("  the same lm_head over 1 row", best["draft_head_one_row"]),
            ("bookkeeping: committed tokens, EOS, counters", best["bookkeeping"]),
            ("sum of the parts", sum_parts),
            ("round: speculative_round, one program", best["round_one_program"]),
            ("round: in speculative_generate's loop", sfit["per_iteration"]),
            ("loop alone, per iteration (same carry)", lfit["per_iteration"]),
            ("per call: prefill (target + draft), alone", best["prefill"]),
            ("  target prefill over the padded prompt, logits at every position", best["target_prefill"]),
            ("  target prefill, no logits (the loops project the last prompt row only)", best["target_prefill_no_logits"]),
            ("per call: fixed cost of speculative_generate (loop fit)", sfit["fixed"]),
            ("per call: fixed cost of vanilla.generate (loop fit)", vfit["fixed"]),
            ("host per call: dispatch of speculative_generate", min(disp)),
            ("host per call: fetch of the outputs", min(fetch)),
            ("host per call: pad prompts + transfer", min(prep))]
  for label, ms in table:
    rows.setdefault(label, {})[b] = (ms, ms / unit)
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--target", default="smollm2-135m-instruct", help="Registry name, GGUF or HF dir (real weights).")
  ap.add_argument("--random_target", default=None, help="Random weights in this archs.ARCHS shape instead.")
  ap.add_argument("--layers", type=int, default=0, help="With --random_target: override the layer count (>= 4).")
  ap.add_argument("--dtype", default=None, help="Compute/param dtype (default float32; bfloat16 with --random_target).")
  ap.add_argument("--scan_layers", type=int, default=0, help="0 (default): unrolled layers, what generate/evaluate "
                  "load (config.generate.scan_layers); 1: the layers under nn.scan (training's layout)")
  ap.add_argument("--draft", default=None, help="Trained draft directory (default: a random draft).")
  ap.add_argument("--draft_vocab", type=int, default=32000, help="Draft vocabulary of the random draft.")
  ap.add_argument("--tree_depth", type=int, default=SHAPE_DEFAULTS["depth"])
  ap.add_argument("--top_k", type=int, default=SHAPE_DEFAULTS["top_k"])
  ap.add_argument("--total_tokens", type=int, default=SHAPE_DEFAULTS["total_tokens"])
  ap.add_argument("--mode", default=SHAPE_DEFAULTS["mode"], choices=("tree", "chain"))
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--untie_lm_head", default="auto", help="auto|true|false: a tied target's vocabulary projection "
                  "as its own [H, V] kernel (auto: on CPUs; what generate/evaluate load, config.generate.untie_lm_head)")
  ap.add_argument("--precision", default=None, choices=PRECISIONS, help="Matmul precision (default: JAX's).")
  ap.add_argument("--batches", default="1,4")
  ap.add_argument("--bench", default="mt_bench", help="Prompt set for a real target (<data_root>/eval/eagle/).")
  ap.add_argument("--data_root", default=DEFAULT_DATA_ROOT)
  ap.add_argument("--prompt_len", type=int, default=128, help="Prompt tokens when the prompts are random ids.")
  ap.add_argument("--max_new_tokens", type=int, default=128, help="Loop fits use this and a quarter of it.")
  ap.add_argument("--warm_rounds", type=int, default=3, help="Rounds run before the parts are timed.")
  ap.add_argument("--nodes", default="1,2,4,8,16,32,64", help="Node counts of the verification sweep.")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--output", default=None, help="Also write the JSON here.")
  args = ap.parse_args()
  args.nodes = [int(x) for x in args.nodes.split(",") if x]
  if args.random_target and args.layers and args.layers < 4:
    sys.exit("error: --layers must be >= 4 (the draft reads target layers 2, L//2 and L-3)")
  args.dtype = args.dtype or ("bfloat16" if args.random_target else "float32")
  tree_cfg = TreeConfig(depth=args.tree_depth, top_k=args.top_k, total_tokens=args.total_tokens, mode=args.mode)

  target = None
  if args.random_target:
    tm, tp = random_target(args)
    name = f"random {args.random_target}" + (f" ({args.layers} layers)" if args.layers else "")
  else:
    target = load_target(args.target, dtype=args.dtype, scan_layers=bool(args.scan_layers),
                         untie_lm_head=untie_on_this_device(args.untie_lm_head))
    tm, tp, name = target.model, target.params, args.target
  if args.draft:
    dcfg, dp, d2t, _ = load_draft(args.draft, tm.cfg)
    dm = Eagle3Draft(dcfg)
  else:
    dm, dp, d2t = random_draft(tm, tp, args.draft_vocab, args.seed)

  batches = [int(x) for x in args.batches.split(",")]
  rows, results = {}, {}
  with matmul_precision(args.precision):
    for b in batches:
      prompts, source = prompts_for(args, target, tm.cfg.vocab_size, b)
      print(f"batch {b}: profiling ({source}) ...", file=sys.stderr, flush=True)
      results[b] = profile_batch(args, tm, tp, dm, dp, d2t, tree_cfg, prompts, rows)
      results[b]["prompts"] = source

  dev = jax.devices()[0]
  print(f"\n{name}, {args.dtype}, scan_layers {args.scan_layers}, draft {args.draft or 'random'}, {tree_cfg}, "
        f"T={args.temperature:g}, precision {args.precision or 'JAX default'}, device {dev.device_kind} "
        f"({dev.platform}), jax {jax.__version__}")
  head = "| part | " + " | ".join(f"B={b} ms | B={b} steps" for b in batches) + " |"
  print(head)
  print("|---|" + "---|---|" * len(batches))
  for label, per_b in rows.items():
    cell = lambda b: f"{per_b[b][0]:.2f} | {per_b[b][1]:.2f}" if b in per_b else "- | -"  # noqa: E731
    print(f"| {label} | " + " | ".join(cell(b) for b in batches) + " |")
  print("\n| verification nodes | " + " | ".join(str(n) for n in args.nodes) + " |")
  print("|---|" + "---|" * len(args.nodes))
  for b in batches:
    print(f"| B={b} ms | " + " | ".join(f"{results[b]['verify_by_nodes'][n]:.2f}" for n in args.nodes) + " |")
  for b in batches:
    r = results[b]
    print(f"B={b}: tau {r['tau']:.2f}, round {r['round_in_decode_steps']:.2f} decode steps, tau / round "
          f"{r['projected_speedup_per_round']:.2f}x; rebuilt rounds equal speculative_generate at "
          f"{r['rebuilt_round_matches']['equal']}/{r['rebuilt_round_matches']['tokens_compared']} tokens")
  tree = dict(depth=tree_cfg.depth, top_k=tree_cfg.top_k, total_tokens=tree_cfg.total_tokens, mode=tree_cfg.mode)
  summary = dict(target=name, dtype=args.dtype, draft=args.draft or "random", tree=tree,
                 temperature=args.temperature, precision=args.precision, scan_layers=bool(args.scan_layers),
                 max_new_tokens=args.max_new_tokens, device=f"{dev.device_kind} ({dev.platform})",
                 machine=f"{platform.machine()} {os.cpu_count()} cores", jax=jax.__version__,
                 date=time.strftime("%Y-%m-%d %H:%M"), batches={str(b): results[b] for b in batches})
  line = json.dumps(summary, default=lambda o: float(o) if np.isscalar(o) else str(o))
  print(line)
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()

"""Would stopping a chain early on the draft's confidence pay? An exact T=0 replay with costs measured here.

  python benchmarks/confidence_gate.py --draft ../shared/drafts/smollm2-eagle3-gpu-1500/draft \
      --first 10 --prompts 10 --output runs/issue12/confidence_gate.json

An early stop of the expansion, when the draft's confidence says more depth will not be accepted, could save
verification work. Before building one into the decoding loop (a verification width chosen per round by
`lax.switch` over static widths), this measures what it could give, for the gate "verify the leading draft tokens whose cumulative
draft probability is >= g":

  acceptance  exact at T=0, as `vsd_jax.decoding.autotune` replays it: the target's greedy continuations of
              --prompts prompts per EAGLE set (from index --first on; the evaluation scores the first 10), the
              draft's greedy chain of --depth tokens at every committed length with its probabilities, and the
              rounds replayed as greedy verification would commit them with the gate applied;
  cost        per round, the target's forward over 1 + kept tokens plus the draft side of a chain as deep as
              the draft steps the gate lets run (both timed here, interleaved, as the autotuner times them: the
              draft side is `speculative.Round`'s own expand / accept / commit / draft update).

The cost model is optimistic for gating: it charges no switch and no padding, so the speedups are an upper
bound on what a gated chain would measure. `g = 0` is the plain chain of that depth (what autotune chooses from).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vsd_jax.config_base import DEFAULT_DATA_ROOT, base_config  # noqa: E402
from vsd_jax.data.chat import prompt_encoder  # noqa: E402
from vsd_jax.data.prompt_file import read_prompt_file  # noqa: E402
from vsd_jax.decoding import autotune  # noqa: E402
from vsd_jax.decoding.runner import cache_slots  # noqa: E402
from vsd_jax.decoding.tree import TreeConfig  # noqa: E402
from vsd_jax.models.eagle3 import Eagle3Draft  # noqa: E402
from vsd_jax.models.features import embedding_matrix  # noqa: E402
from vsd_jax.models.kv_cache import KVCache  # noqa: E402
from vsd_jax.weights import decoding_load_options, load_target  # noqa: E402
from vsd_jax.weights.draft_io import load_draft  # noqa: E402

SETS = "mt_bench,humaneval,gsm8k,alpaca,sum,qa"
GATES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)


def chain_states(target, draft, dparams, d2t, calib, depth):
  """Per sequence: (log q of the draft's greedy chain [R, depth] cumulative, correct [R, depth]) at every committed
  length R from the prompt's end (the draft's chain as `expand_tree` grows it; correct = equals the target's greedy
  continuation there)."""
  shape = TreeConfig(depth=depth, top_k=1, total_tokens=depth)
  slots = calib.ids.shape[1] + shape.scratch_slots + depth + 2
  states = jax.jit(autotune.sequence_states, static_argnums=(0, 2, 6))(
      target.model, target.params, draft, dparams, jnp.asarray(calib.ids), jnp.asarray(calib.lens), slots)
  embed = embedding_matrix(target.params)

  def one(dp, seq, seq_len, roots, logits, hidden, cache):
    tree, correct = autotune.trees_at_roots(shape, draft, dp, embed, d2t, seq, seq_len, roots, logits, hidden, cache)
    return tree.scores[:, 1:], correct[:, 1:]

  fn = jax.jit(one)
  rows = int(np.max(calib.lens - calib.prompt_lens))
  out = []
  for b in range(calib.ids.shape[0]):
    p, n = int(calib.prompt_lens[b]), int(calib.lens[b])
    roots = np.minimum(p + np.arange(rows), n - 1).astype(np.int32)
    lq, ok = fn(dparams, jnp.asarray(calib.ids[b]), n, jnp.asarray(roots), states[0][b], states[1][b],
                KVCache(states[2].k[:, b:b + 1], states[2].v[:, b:b + 1]))
    out.append((p, n, np.asarray(lq), np.asarray(ok)))
  return out


def replay(states, depth, gate, verify, side):
  """(tau, predicted speedup, mean verified tokens) of the gated chain; verify {n: s}, side {d: s}."""
  new = rounds = 0
  cost = width = 0.0
  log_gate = np.log(gate) if gate > 0 else -np.inf
  for p, n, lq, ok in states:
    kept = np.sum(np.cumprod(lq[:, :depth] >= log_gate, axis=1), axis=1)          # per committed length
    acc = np.sum(np.cumprod(ok[:, :depth] & (np.arange(depth) < kept[:, None]), axis=1), axis=1)
    visits = autotune.replay_visits(acc, p, n)
    cost += sum(verify[1 + kept[i]] + side[1 + min(depth - 1, kept[i])] for i in visits)
    width += sum(1 + kept[i] for i in visits)
    rounds += len(visits)
    new += n - p
  return new / rounds, new * verify[1] / cost, width / rounds


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--draft", required=True)
  ap.add_argument("--bench", default=SETS)
  ap.add_argument("--data_root", default=DEFAULT_DATA_ROOT)
  ap.add_argument("--first", type=int, default=10, help="first prompt index per set (evaluate scores 0..9)")
  ap.add_argument("--prompts", type=int, default=2, help="prompts per set")
  ap.add_argument("--max_new_tokens", type=int, default=96)
  ap.add_argument("--depth", type=int, default=4, help="deepest chain considered")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--output", default=None)
  args = ap.parse_args()

  cfg = base_config()
  target = load_target("smollm2-135m-instruct", **decoding_load_options(cfg))
  dcfg, dparams, d2t, _ = load_draft(args.draft, target.config)
  draft, d2t = Eagle3Draft(dcfg), jnp.asarray(d2t)
  enc = prompt_encoder(target, cfg)
  prompts = [enc.encode_user(m) for b in args.bench.split(",") for _, m in read_prompt_file(
      os.path.join(args.data_root, "eval", "eagle", b, "question.jsonl"))[args.first:args.first + args.prompts]]
  t0 = time.time()
  calib = autotune.greedy_continuations(target, prompts, args.max_new_tokens, enc.eos_ids, enc.pad_id)
  states = chain_states(target, draft, dparams, d2t, calib, args.depth)
  print(f"replay data: {len(prompts)} prompts, {int(np.sum(calib.lens - calib.prompt_lens))} tokens, "
        f"{time.time() - t0:.0f} s", file=sys.stderr)

  context = int(np.mean(calib.lens))
  slots = cache_slots(calib.ids.shape[1], args.max_new_tokens, 2 * args.depth + 4)
  timers = {("verify", n): autotune.verify_timer(target, n, 1, context, slots) for n in range(1, args.depth + 2)}
  timers.update({("side", d): autotune.draft_side_timer(target, draft, dparams, d2t, TreeConfig(d, 1, d, "chain"),
                                                          1, context, slots) for d in range(1, args.depth + 1)})
  times = autotune.time_interleaved(timers, args.repeats)
  verify = {n: times[("verify", n)] for n in range(1, args.depth + 2)}
  side = {d: times[("side", d)] for d in range(1, args.depth + 1)}

  rows = []
  for depth in range(1, args.depth + 1):
    for gate in GATES:
      tau, speedup, width = replay(states, depth, gate, verify, side)
      rows.append(dict(depth=depth, gate=gate, tau=tau, predicted_speedup=speedup, verified_tokens=width))
  print("verify ms by tokens: " + ", ".join(f"{n}: {t * 1e3:.1f}" for n, t in verify.items()))
  print("chain draft side ms by depth: " + ", ".join(f"{d}: {t * 1e3:.1f}" for d, t in side.items()))
  print("| chain depth | gate g | tau | verified tokens per round | predicted speedup (upper bound) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['depth']} | {r['gate']:g} | {r['tau']:.3f} | {r['verified_tokens']:.2f} | "
          f"{r['predicted_speedup']:.3f}x |")
  # Calibration of the first draft token: how often it is accepted, by its draft probability (every committed
  # length of every sequence, not only those the replay visits).
  q1 = np.concatenate([np.exp(lq[:n - p - 1, 0]) for p, n, lq, _ in states])
  a1 = np.concatenate([ok[:n - p - 1, 0] for p, n, _, ok in states])
  bins = []
  print("| first draft token's probability | states | accepted |\n|---|---|---|")
  for lo, hi in ((0, .1), (.1, .2), (.2, .3), (.3, .5), (.5, .7), (.7, .9), (.9, 1.01)):
    m = (q1 >= lo) & (q1 < hi)
    bins.append(dict(lo=lo, hi=min(hi, 1.0), states=int(m.sum()), accepted=float(a1[m].mean()) if m.any() else None))
    print(f"| {lo:g}-{min(hi, 1.0):g} | {int(m.sum())} | {a1[m].mean() if m.any() else float('nan'):.2f} |")
  best = max(rows, key=lambda r: r["predicted_speedup"])
  plain = max((r for r in rows if r["gate"] == 0), key=lambda r: r["predicted_speedup"])
  print(f"best gated: depth {best['depth']} g {best['gate']:g} {best['predicted_speedup']:.3f}x; best plain chain: "
        f"depth {plain['depth']} {plain['predicted_speedup']:.3f}x")
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(dict(rows=rows, first_token_calibration=bins, verify_ms={n: t * 1e3 for n, t in verify.items()},
                     side_ms={d: t * 1e3 for d, t in side.items()}, prompts=len(prompts), first=args.first,
                     max_new_tokens=args.max_new_tokens, device=str(jax.devices()[0]),
                     date=time.strftime("%Y-%m-%d %H:%M")), f, indent=1)


if __name__ == "__main__":
  main()

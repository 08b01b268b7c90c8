"""Decode tokens/s and train-step time of two checkouts of this project, alternated in one run.

  git worktree add /tmp/before <rev>      # or any clone at the revision to compare against
  python benchmarks/ab_checkouts.py --a /tmp/before --b . [--c /tmp/other] --reps 2 --out runs/ab.json

Each rep runs one fresh process per checkout (a, b[, c], a, b, ...), each importing `vsd_jax` from its own tree
(PYTHONPATH=<tree>), on the same machine. A process loads the embedded default target (SmolLM2-135M GGUF) and
the shipped GPU draft (`--draft`), then, after one untimed compile call each:
  - decoding, T=0, batch 1, the first --prompts mt_bench prompts padded to one shape, --max_new_tokens each:
    vanilla (`decoding.vanilla.generate`), speculative tree (depth 5, top_k 4, 12 tokens: generate's
    defaults) and chain (depth 3) (`decoding.speculative.speculative_generate`); tokens/s and tau;
  - training, EAGLE-3 and VSD (base config, default VSD settings), one jitted step on a fixed [B, T] batch of
    draft-vocabulary tokens; seconds per step (mean of --train_steps).
Only public entry points that both layouts have are used (the training methods are looked up where each
layout keeps them). Prints and writes per-rep figures and the median per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = r'''
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from vsd_jax.weights import load_target
from vsd_jax.weights.draft_io import load_draft
from vsd_jax.models.eagle3 import Eagle3Draft
from vsd_jax.decoding.vanilla import generate
from vsd_jax.decoding.runner import bucket
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.config_base import base_config
from vsd_jax.training.trainer import MethodSteps
import vsd_jax
TREE = os.path.dirname(os.path.dirname(os.path.abspath(vsd_jax.__file__)))
if os.path.isdir(os.path.join(TREE, "vsd_jax", "methods")):
  from vsd_jax.methods import build_method
else:  # older checkouts: methods lived under vsd_jax/training/methods
  from vsd_jax.training.methods import build_method

a = json.loads(sys.argv[1])
target = load_target("smollm2-135m-instruct")
tok = target.tokenizer
qs = [json.loads(l)["turns"][0] for l in open(a["prompts_file"])][:a["prompts"]]
enc = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True)["input_ids"]
       for q in qs]
P = max(len(e) for e in enc)
eos = tuple(sorted(set(target.config.eos_token_ids) | {tok.eos_token_id}))
dcfg, dparams, d2t, t2d = load_draft(a["draft"], target.config)
draft = Eagle3Draft(dcfg)
rng = jax.random.PRNGKey(0)
new = a["max_new_tokens"]
out = {}

def run(fn):
  fn(0)  # compile
  toks, rounds, t0 = 0, 0, time.perf_counter()
  for i in range(len(enc)):
    n, r = fn(i)
    toks, rounds = toks + n, rounds + r
  dt = time.perf_counter() - t0
  return dict(tokens_per_s=toks / dt, tau=toks / max(rounds, 1), tokens=toks)

def row(i):
  ids = np.zeros((1, P), np.int32); ids[0, :len(enc[i])] = enc[i]
  return jnp.asarray(ids), jnp.asarray([len(enc[i])], jnp.int32)

def vanilla(i):
  ids, lens = row(i)
  o = generate(target.model, target.params, ids, lens, rng, 0.0, max_new_tokens=new, cache_slots=P + new,
               eos_ids=eos, pad_id=0)
  return int(o.num_new[0]), int(o.rounds[0])

def spec(cfg):
  slots = bucket(required_slots(P, new, cfg), 128)
  def f(i):
    ids, lens = row(i)
    o = speculative_generate(target.model, target.params, draft, dparams, jnp.asarray(d2t), ids, lens, rng,
                             tree_cfg=cfg, max_new_tokens=new, cache_slots=slots, eos_ids=eos, temperature=0.0,
                             pad_id=0)
    return int(o.num_new[0]), int(o.rounds[0])
  return f

out["vanilla"] = run(vanilla)
out["tree"] = run(spec(TreeConfig(depth=5, top_k=4, total_tokens=12)))
out["chain"] = run(spec(TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain")))

class Vocab:
  pass
vocab = Vocab(); vocab.d2t, vocab.t2d = np.asarray(d2t), np.asarray(t2d)
b, t = a["batch"], a["seq_len"]
draft_ids = np.arange(len(vocab.d2t)) + np.asarray(vocab.d2t)
g = np.random.default_rng(0)
batch = dict(input_ids=draft_ids[g.integers(0, len(draft_ids), (b, t))].astype(np.int32),
             attention_mask=np.ones((b, t), np.int32),
             loss_mask=(np.arange(t)[None, :] >= t // 4).repeat(b, 0).astype(np.int32))
for name in ("eagle3", "vsd"):
  c = base_config()
  c.method = name
  c.train.batch_size = b
  steps = MethodSteps(c, build_method(c, target, vocab))
  jax.block_until_ready(steps(batch))
  t0 = time.perf_counter()
  for _ in range(a["train_steps"]):
    jax.block_until_ready(steps(batch))
  out[f"train_{name}_step_s"] = (time.perf_counter() - t0) / a["train_steps"]
stray = sorted(m.__file__ for n, m in sys.modules.items()
               if n.startswith("vsd_jax") and getattr(m, "__file__", None) and not m.__file__.startswith(TREE))
assert not stray, f"modules imported from outside {TREE}: {stray}"
print("AB_JSON " + json.dumps(out))
'''


def probe(tree: str, args) -> dict:
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env.pop("XLA_FLAGS", None)
  spec = dict(prompts_file=os.path.abspath(args.prompts_file), prompts=args.prompts, draft=os.path.abspath(args.draft),
              max_new_tokens=args.max_new_tokens, batch=args.batch, seq_len=args.seq_len, train_steps=args.train_steps)
  r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], cwd=os.path.abspath(tree), env=env,
                     capture_output=True, text=True)
  line = [x for x in r.stdout.splitlines() if x.startswith("AB_JSON ")]
  if r.returncode or not line:
    raise RuntimeError(f"probe failed in {tree} (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
  return json.loads(line[0][len("AB_JSON "):])


def main():
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  shared = os.path.join(here, "..", "shared")
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--a", required=True, help="first checkout (e.g. the revision before a change)")
  p.add_argument("--b", default=here, help="second checkout (default: this one)")
  p.add_argument("--c", default="", help="optional third checkout")
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--prompts_file", default=os.path.join(shared, "data", "eval", "eagle", "mt_bench", "question.jsonl"))
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--max_new_tokens", type=int, default=96)
  p.add_argument("--draft", default=os.path.join(shared, "drafts", "smollm2-eagle3-gpu-1500", "draft"))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--train_steps", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()
  keys = ("a", "b", "c") if args.c else ("a", "b")
  runs = {k: [] for k in keys}
  for rep in range(args.reps):
    for key in keys:
      r = probe(getattr(args, key), args)
      runs[key].append(r)
      print(f"rep {rep} {key}: {json.dumps(r)}", flush=True)

  def med(key, path):
    vals = [r[path[0]][path[1]] if len(path) == 2 else r[path[0]] for r in runs[key]]
    return statistics.median(vals)

  metrics = [("vanilla", "tokens_per_s"), ("tree", "tokens_per_s"), ("chain", "tokens_per_s"), ("tree", "tau"),
             ("chain", "tau"), ("train_eagle3_step_s",), ("train_vsd_step_s",)]
  summary = {"/".join(m): dict({k: med(k, m) for k in keys}, **{f"{k}_over_a": med(k, m) / med("a", m)
                                                                 for k in keys[1:]}) for m in metrics}
  print(json.dumps(summary, indent=1))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), runs=runs, summary=summary), f, indent=1)


if __name__ == "__main__":
  main()

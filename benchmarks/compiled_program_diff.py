"""Are two checkouts' decoding programs the same program? Compiles them in each and compares the optimized HLO.

  git worktree add /tmp/before <rev>
  python benchmarks/compiled_program_diff.py --a /tmp/before --b . [--out runs/hlo]

A refactor of the decoding code that leaves XLA's optimized program unchanged cannot change its speed, whatever a
noisy timing says; this answers that question exactly. One fresh process per checkout (PYTHONPATH=<tree>) loads
the embedded default target (SmolLM2-135M GGUF) and the shipped GPU draft, and compiles for one [1, --prompt_len]
prompt and --max_new_tokens: vanilla decoding (`decoding.vanilla.generate`) and speculative decoding
(`decoding.speculative.speculative_generate`) with a tree (depth 5, top_k 4, 12 tokens) and a chain (depth 3).
Each compiled module's instructions are written with names, metadata and backend configs stripped, sorted; the
two checkouts are the same program when the sorted lists are equal. Prints, per program, the instruction count
and whether they match (the diff's first lines when not). Compilation only: nothing is timed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

PROBE = r'''
import os, sys
import jax, jax.numpy as jnp
from vsd_jax.weights import load_target
from vsd_jax.weights.draft_io import load_draft
from vsd_jax.models.eagle3 import Eagle3Draft
from vsd_jax.decoding.runner import bucket
from vsd_jax.decoding.speculative import required_slots, speculative_generate
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.decoding.vanilla import generate

out_dir, draft_dir, p, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
target = load_target("smollm2-135m-instruct")
dcfg, dparams, d2t, _ = load_draft(draft_dir, target.config)
ids, lens, rng = jnp.zeros((1, p), jnp.int32), jnp.array([p - 4], jnp.int32), jax.random.PRNGKey(0)
programs = {"vanilla": generate.lower(target.model, target.params, ids, lens, rng, 0.0, max_new_tokens=new,
                                      cache_slots=bucket(p + new, 128), eos_ids=(2,), pad_id=0)}
for name, cfg in [("tree", TreeConfig(depth=5, top_k=4, total_tokens=12)),
                  ("chain", TreeConfig(depth=3, top_k=1, total_tokens=3, mode="chain"))]:
  programs[name] = speculative_generate.lower(
      target.model, target.params, Eagle3Draft(dcfg), dparams, jnp.asarray(d2t), ids, lens, rng, tree_cfg=cfg,
      max_new_tokens=new, cache_slots=bucket(required_slots(p, new, cfg), 128), eos_ids=(2,), temperature=0.0,
      pad_id=0)
for name, lowered in programs.items():
  with open(os.path.join(out_dir, name + ".hlo"), "w") as f:
    f.write(lowered.compile().as_text())
'''


def instructions(hlo_text: str) -> list:
  """The module's instructions, names and annotations stripped, sorted (a multiset comparable across runs)."""
  lines = []
  for line in hlo_text.splitlines():
    if " = " not in line:
      continue
    line = re.sub(r", (metadata|frontend_attributes)=\{[^}]*\}", "", line)
    line = re.sub(r", backend_config=.*$", "", line)
    line = re.sub(r"%[A-Za-z0-9_.\-]+", "%v", line)
    lines.append(re.sub(r"[A-Za-z_][A-Za-z0-9_\-]*\.[0-9]+(\.[0-9]+)*", "N", line).strip())
  return sorted(lines)


def compile_checkout(tree: str, out_dir: str, args) -> None:
  os.makedirs(out_dir, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
  subprocess.run([sys.executable, "-c", PROBE, out_dir, args.draft, str(args.prompt_len), str(args.max_new_tokens)],
                 check=True, env=env, cwd=out_dir)


def main():
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--a", required=True, help="first checkout (e.g. the revision before a change)")
  p.add_argument("--b", default=here, help="second checkout (default: this one)")
  p.add_argument("--draft", default=os.path.join(here, "..", "shared", "drafts", "smollm2-eagle3-gpu-1500", "draft"))
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--max_new_tokens", type=int, default=96)
  p.add_argument("--out", default=os.path.join(here, "runs", "compiled_program_diff"))
  args = p.parse_args()
  for side in ("a", "b"):
    compile_checkout(getattr(args, side), os.path.join(args.out, side), args)
  same = True
  for name in ("vanilla", "tree", "chain"):
    a, b = (instructions(open(os.path.join(args.out, side, name + ".hlo")).read()) for side in ("a", "b"))
    match = a == b
    same &= match
    print(f"{name}: {len(a)} vs {len(b)} instructions, {'the same program' if match else 'DIFFERENT'}")
    if not match:
      only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
      print("  only in a:", *only_a[:5], sep="\n    ")
      print("  only in b:", *only_b[:5], sep="\n    ")
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  main()

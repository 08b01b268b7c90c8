"""VSD vs EAGLE-3 on the embedded default target: the issue-5 table, reproducible on a 2-core CPU.

  python benchmarks/vsd_experiment.py --base_draft runs/tiny/draft --steps 24 --out runs/vsd_exp

Design (sized to one working session): one cached dataset (configs/tiny_vsd.py = configs/tiny.py's data),
one EAGLE-3 checkpoint (--base_draft, e.g. the draft `python -m vsd_jax.train --config configs/tiny.py`
exports), and every arm a continuation of it for the same number of optimizer steps with the same lr
schedule, batch and data order:

  eagle3       EAGLE-3's TTT loss only (the fair baseline)
  vsd          ARW + CAR + mu * EAGLE-3, MCMC E-step        (VSD_METHOD.md defaults, K/S/M of tiny_vsd)
  vsd_no_arw   plain EM likelihood of the E-step sample instead of ARW
  vsd_no_car   lambda_car = 0
  vsd_snis     the SNIS E-step instead of MCMC
Headline arms (eagle3, vsd) run with every --seeds value (the seed drives anchors, paths and data order).

Stage 1 trains each arm with `python -m vsd_jax.train` (its held-out report: EAGLE-3 step-0 agreement,
simulated tau and the draft's own greedy chain tau on mt_bench), skipping arms whose report exists.
Stage 2 loads the target once and, per eval set and temperature, runs vanilla decoding once and
speculative decoding with every arm's draft (same prompts, same tree settings, batch 1), so every
speedup is against a vanilla run of the same process. Writes <out>/results.json and <out>/results.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ARMS = {
    "vsd": [],
    "eagle3": ["--config.method=eagle3"],
    "vsd_no_arw": ["--config.vsd.arw=False"],
    "vsd_no_car": ["--config.vsd.lambda_car=0.0"],
    "vsd_snis": ["--config.vsd.estep=snis"],
}
HEADLINE = ("eagle3", "vsd")


def runs(args):
  """(arm, seed) in run order: every arm at the first seed, then the headline arms at the other seeds."""
  arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
  for arm in arms:
    if arm not in ARMS:
      sys.exit(f"error: unknown arm {arm!r}; use some of {list(ARMS)}")
  return [(a, seeds[0]) for a in arms] + [(a, s) for s in seeds[1:] for a in arms if a in HEADLINE]


def train_arm(args, arm, seed):
  workdir = os.path.join(args.out, f"{arm}_s{seed}")
  report = os.path.join(workdir, "report.json")
  if os.path.isfile(report):
    with open(report) as f:
      r = json.load(f)
    if r.get("steps") == args.steps and r.get("stopped") == "done":
      return r
  cmd = [sys.executable, "-m", "vsd_jax.train", "--config", os.path.join(REPO, "configs", "tiny_vsd.py"),
         f"--config.workdir={workdir}", f"--config.draft.init_from={args.base_draft}", f"--config.seed={seed}",
         f"--config.train.total_steps={args.steps}", f"--config.train.warmup_steps={args.warmup}",
         f"--config.train.lr={args.lr}", f"--config.train.checkpoint_every={args.steps}",
         "--config.train.progress_bar=False"] + ARMS[arm] + args.extra
  print("+", " ".join(cmd), file=sys.stderr, flush=True)
  t0 = time.time()
  subprocess.run(cmd, check=True, cwd=REPO)
  with open(report) as f:
    r = json.load(f)
  r["wall_s"] = time.time() - t0
  with open(report, "w") as f:
    json.dump(r, f, indent=1)
  return r


def evaluate(args, arms):
  import jax
  import jax.numpy as jnp

  from vsd_jax.cli_config import _load_file
  from vsd_jax.data.chat import prompt_encoder
  from vsd_jax.data.prompt_file import read_prompt_file
  from vsd_jax.decoding.runner import check_capacity, run_batches
  from vsd_jax.decoding.speculative import required_slots, speculative_generate
  from vsd_jax.decoding.tree import TreeConfig
  from vsd_jax.decoding.vanilla import generate
  from vsd_jax.eval.metrics import summarize
  from vsd_jax.models.eagle3 import Eagle3Draft
  from vsd_jax.weights import load_target
  from vsd_jax.weights.draft_io import load_draft

  target = load_target("smollm2-135m-instruct")
  # Prompts encoded as the arms' training data was (configs/tiny_vsd.py), with the pipeline's end/pad ids.
  enc = prompt_encoder(target, _load_file(os.path.join(REPO, "configs", "tiny_vsd.py")))
  eos, pad_id = enc.eos_ids, enc.pad_id
  tree_cfg = TreeConfig(depth=args.tree_depth, top_k=args.top_k, total_tokens=args.total_tokens)
  n = args.max_new_tokens
  drafts = {name: load_draft(path, target.config) for name, path in arms.items()}
  results = {}
  for bench in args.bench.split(","):
    items = read_prompt_file(os.path.join(args.data_dir, bench, "question.jsonl"))[:args.num_prompts]
    prompts = [enc.encode_user(m) for _, m in items]
    for temp in [float(t) for t in args.temperature.split(",")]:
      key = jax.random.PRNGKey(0)

      def vcall(ids, lens):
        o = generate(target.model, target.params, jnp.asarray(ids), jnp.asarray(lens), key, temp, max_new_tokens=n,
                     cache_slots=check_capacity(lens, n, 2048), eos_ids=eos, pad_id=pad_id)
        return o.tokens, o.num_new, o.rounds

      van = run_batches(prompts, 1, vcall, pad_id)
      for name, (dcfg, dparams, d2t, _) in drafts.items():
        draft = Eagle3Draft(dcfg)

        def scall(ids, lens):
          slots = -(-required_slots(ids.shape[1], n, tree_cfg) // 128) * 128
          o = speculative_generate(target.model, target.params, draft, dparams, jnp.asarray(d2t), jnp.asarray(ids),
                                   jnp.asarray(lens), key, tree_cfg=tree_cfg, max_new_tokens=n, cache_slots=slots,
                                   eos_ids=eos, temperature=temp, pad_id=pad_id)
          return o.tokens, o.num_new, o.rounds, o.accept_hist

        r = summarize(van, run_batches(prompts, 1, scall, pad_id))
        results.setdefault(name, {})[f"{bench}@T={temp:g}"] = r
        print(f"{name} {bench}@T={temp:g}: tau {r['tau']:.3f} speedup {r['speedup']:.2f}x "
              f"identical {r['identical_outputs']}/{r['prompts']}", file=sys.stderr, flush=True)
  return results


def table(args, reports, results) -> str:
  temps = [f"{float(t):g}" for t in args.temperature.split(",")]
  head = ["arm", "steps", "train s/step", "held-out acc@0", "tau_sim", "chain tau (greedy)"]
  for t in temps:
    head += [f"tau T={t}", f"speedup T={t}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, rep in reports.items():
    h = rep.get("heldout", {})
    row = [name, str(rep.get("steps", "-")),
           f"{rep['stages']['train_s'] / max(rep.get('steps', 1), 1):.1f}" if "stages" in rep else "-",
           f"{h['step_acc'][0]:.3f}" if h else "-", f"{h['tau_simulated']:.3f}" if h else "-",
           f"{h['chain']['tau_chain']:.3f}" if h else "-"]
    for t in temps:
      rs = [r for k, r in results.get(name, {}).items() if k.endswith(f"@T={t}")]
      row += [f"{sum(r['tau'] for r in rs) / len(rs):.3f}" if rs else "-",
              f"{sum(r['speedup'] for r in rs) / len(rs):.2f}x" if rs else "-"]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base_draft", default=os.path.join(REPO, "runs", "tiny", "draft"))
  ap.add_argument("--out", default=os.path.join(REPO, "runs", "vsd_exp"))
  ap.add_argument("--arms", default=",".join(ARMS))
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--lr", type=float, default=3e-4)
  ap.add_argument("--bench", default="mt_bench,humaneval,gsm8k,alpaca,sum,qa")
  ap.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "eval", "eagle"))
  ap.add_argument("--temperature", default="0,1")
  ap.add_argument("--num_prompts", type=int, default=2)
  ap.add_argument("--max_new_tokens", type=int, default=48)
  ap.add_argument("--tree_depth", type=int, default=4)
  ap.add_argument("--top_k", type=int, default=4)
  ap.add_argument("--total_tokens", type=int, default=8)
  ap.add_argument("--skip_eval", action="store_true")
  ap.add_argument("extra", nargs="*", help="more --config.x=y overrides for every arm (after --)")
  args = ap.parse_args()
  if not os.path.isfile(os.path.join(args.base_draft, "draft_config.json")):
    sys.exit(f"error: --base_draft {args.base_draft!r} holds no trained draft; run "
             "`python -m vsd_jax.train --config configs/tiny.py` first (it exports <workdir>/draft)")
  os.makedirs(args.out, exist_ok=True)
  reports = {"base (start point)": {}}
  for arm, seed in runs(args):
    reports[f"{arm}_s{seed}"] = train_arm(args, arm, seed)
  results = {}
  if not args.skip_eval:
    drafts = {"base (start point)": args.base_draft}
    drafts.update({name: os.path.join(args.out, name, "draft") for name in reports if name != "base (start point)"})
    results = evaluate(args, drafts)
  md = table(args, reports, results)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(dict(args=vars(args), reports=reports, results=results), f, indent=1, default=float)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(md + "\n")
  print(md)


if __name__ == "__main__":
  main()

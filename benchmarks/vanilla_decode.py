"""Vanilla decode throughput: our jitted loop vs transformers' PyTorch `generate`, same prompts, same run.

  python benchmarks/vanilla_decode.py --num_prompts 8 --max_new_tokens 128 [--bench mt_bench] [--scan_layers 1]

Both float32, greedy, batch 1, on the same GGUF weights. Our compile time is excluded (one warm-up
call per length bucket); torch gets one warm-up generate. Prompts run interleaved (ours, then torch,
per prompt) so background load hits both alike. Prints a JSON summary and a Markdown row.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vsd_jax.config_base import DEFAULT_DATA_ROOT, base_config  # noqa: E402
from vsd_jax.data.chat import prompt_encoder  # noqa: E402
from vsd_jax.decoding.runner import check_capacity, pad_prompts  # noqa: E402
from vsd_jax.decoding.vanilla import generate  # noqa: E402
from vsd_jax.data.prompt_file import read_prompt_file  # noqa: E402
from vsd_jax.weights import load_target, untie_vocab_projection  # noqa: E402
# torch and transformers are imported only for the transformers baseline (torch is a test-only dependency).


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--bench", default="mt_bench")
  ap.add_argument("--data_root", default=DEFAULT_DATA_ROOT)
  ap.add_argument("--num_prompts", type=int, default=8)
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--scan_layers", type=int, default=0, help="1: the target's layers under nn.scan (training's "
                  "layout); 0 (what generate/evaluate load, config.generate.scan_layers): unrolled")
  ap.add_argument("--lm_head", default="untied,tied", help="vocabulary projection layouts of our target to time, "
                  "interleaved: 'untied' (its own [H, V] kernel: what generate/evaluate load on CPUs, "
                  "config.generate.untie_lm_head) and/or 'tied' (the embedding's transpose)")
  ap.add_argument("--output", default=None)
  args = ap.parse_args()

  import torch
  from transformers import AutoModelForCausalLM

  target = load_target("smollm2-135m-instruct", scan_layers=bool(args.scan_layers))
  layouts = args.lm_head.split(",")
  if not layouts or set(layouts) - {"untied", "tied"}:
    sys.exit(f"error: --lm_head={args.lm_head!r}: use 'untied', 'tied' or both, comma-separated")
  ours_targets = {name: untie_vocab_projection(target) if name == "untied" else target for name in layouts}
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(target.source), gguf_file=os.path.basename(target.source),
                                            dtype=torch.float32).eval()
  items = read_prompt_file(os.path.join(args.data_root, "eval", "eagle", args.bench, "question.jsonl"))
  enc = prompt_encoder(target, base_config())  # the default target's own template, the pipeline's end ids
  prompts = [enc.encode_user(m) for _, m in items[:args.num_prompts]]
  eos, pad_id = enc.eos_ids, enc.pad_id
  n = args.max_new_tokens

  def ours(p, name):
    t = ours_targets[name]
    ids, lens = pad_prompts([p], pad_id)
    slots = check_capacity(lens, n, 8192)
    out = generate(t.model, t.params, jnp.asarray(ids), jnp.asarray(lens), jax.random.PRNGKey(0), 0.0,
                   max_new_tokens=n, cache_slots=slots, eos_ids=eos, pad_id=pad_id)
    return np.asarray(out.tokens[0, :int(out.num_new[0])]).tolist()

  def theirs(p):
    with torch.no_grad():
      out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=n, do_sample=False, eos_token_id=list(eos), pad_token_id=pad_id)
    return out[0, len(p):].tolist()

  for p in prompts:  # compile every length bucket once
    for name in layouts:
      ours(p, name)
  theirs(prompts[0])
  t_ours, tok_ours, same = dict.fromkeys(layouts, 0.0), dict.fromkeys(layouts, 0), dict.fromkeys(layouts, 0)
  t_theirs, tok_theirs = 0.0, 0
  for p in prompts:  # interleaved prompt by prompt, so load from elsewhere lands on every variant alike
    t0 = time.perf_counter(); b = theirs(p); t_theirs += time.perf_counter() - t0
    tok_theirs += len(b)
    for name in layouts:
      t0 = time.perf_counter(); a = ours(p, name); t_ours[name] += time.perf_counter() - t0
      tok_ours[name] += len(a); same[name] += a == b
  torch_rate = tok_theirs / t_theirs
  per_layout = {name: dict(tokens=tok_ours[name], tok_per_s=tok_ours[name] / t_ours[name],
                           speedup=tok_ours[name] / t_ours[name] / torch_rate, identical_outputs=same[name])
                for name in layouts}
  first = per_layout[layouts[0]]  # the top-level figures: the first layout's (the decoding default first)
  res = dict(bench=args.bench, prompts=len(prompts), max_new_tokens=n, jax_tokens=first["tokens"],
             torch_tokens=tok_theirs, jax_tok_per_s=first["tok_per_s"], torch_tok_per_s=torch_rate,
             speedup=first["speedup"], identical_outputs=first["identical_outputs"], lm_head=layouts[0],
             per_layout=per_layout,
             scan_layers=bool(args.scan_layers),
             machine=f"{platform.machine()} {os.cpu_count()} cores", jax=jax.__version__, torch=torch.__version__,
             torch_threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"))
  print(json.dumps(res, indent=1))
  for name, r in per_layout.items():
    print(f"| {args.bench} | {name} | {len(prompts)} | {n} | {r['tok_per_s']:.1f} | {torch_rate:.1f} | "
          f"{r['speedup']:.2f}x | {r['identical_outputs']}/{len(prompts)} |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()

"""Vanilla vs speculative decoding on the EAGLE evaluation sets, same process, same prompts.

  python -m vsd_jax.evaluate --config configs/tiny.py --draft runs/tiny/draft \
      --bench mt_bench,humaneval,gsm8k,alpaca,sum,qa --data_dir ../shared/data/eval/eagle \
      --temperature 0,1 --num_prompts 10 --max_new_tokens 128 --output_dir runs/tiny/eval

Per set and temperature: tau (new tokens / target forwards), n-alpha (acceptance by depth), tokens/s of
both, speedup; at T=0 the outputs are compared token for token and any mismatch is explained by the
target's logit gap at the first differing token. --precision highest makes every matmul of both decoders
full float32 (XLA's GPU default for float32 is TF32), for outputs identical to vanilla on GPUs too. Writes
results.json, results.md and plots. Prompts are encoded, and decoding stops, as in training
(config.data.chat_template; data/chat.py prompt_encoder).
The target is read straight into its shardings on config.mesh's fsdp x tensor devices (parallel.decode_mesh;
one device with the default mesh).

Multimodal sets (a LLaVA target, e.g. configs/llava.py): question.jsonl lines may carry "image" (a path or a
list; relative to the set's folder or --image_folder; `pkg:<package>/<path>` for a file a package ships) with
`<image>` placeholders in the first turn (none: "<image>\n" in front). Both decoders prefill with the images
(the checkpoint's own processor prepares them), then decode as for text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags

from vsd_jax.cli_config import define_config_flag, define_decoding_shape_flags, run_app
from vsd_jax.decoding.precision import PRECISIONS

_CONFIG = define_config_flag()
flags.DEFINE_string("draft", None, "Trained draft directory (<workdir>/draft of `vsd_jax.train`).")
flags.DEFINE_string("bench", "mt_bench,humaneval,gsm8k,alpaca,sum,qa", "Comma-separated EAGLE sets (names under "
                    "--data_dir), or paths of question.jsonl files (ending in .jsonl), e.g. the offline image set "
                    "vsd_jax/data/sample_images_questions.jsonl.")
flags.DEFINE_string("data_dir", None, "Folder holding <bench>/question.jsonl (default <data.root>/eval/eagle).")
flags.DEFINE_string("temperature", "0", "Comma-separated temperatures.")
flags.DEFINE_integer("num_prompts", 10, "First N prompts of each set.")
flags.DEFINE_integer("max_new_tokens", 128, "New tokens per prompt.")
define_decoding_shape_flags()
flags.DEFINE_integer("calib_prompts", 2, "Autotuned shape: prompts of each set after the first --num_prompts (so "
                     "never the evaluated ones) whose greedy continuations measure the draft's acceptance.")
flags.DEFINE_string("output_dir", None, "Where results go (default <workdir>/eval).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("image_folder", "", "Folder of relative image paths in question.jsonl (default: its folder).")
flags.DEFINE_enum("precision", None, PRECISIONS, "Matmul precision of target and draft in both decoders (default: "
                  "JAX's, TF32 for float32 on GPUs); 'highest' = full float32, for T=0 output identical to vanilla.")


def first_mismatch_gap(target, prompt_ids, a, b, precision=None, pixel_values=None):
  """Target logit gap (top1 - top2) at the first position where outputs a and b differ.
  pixel_values: a multimodal prompt's images [1, I, C, S, S] (LLaVA)."""
  import jax.numpy as jnp
  import numpy as np
  from vsd_jax.decoding.precision import matmul_precision
  from vsd_jax.models.features import image_inputs
  i = next(k for k in range(min(len(a), len(b)) + 1) if k == min(len(a), len(b)) or a[k] != b[k])
  seq = jnp.asarray([list(prompt_ids) + list(a[:i])], jnp.int32)
  with matmul_precision(precision):
    logits = np.asarray(target.model.apply({"params": target.params}, seq,
                                           **image_inputs(dict(pixel_values=pixel_values))).logits[0, -1])
  top2 = np.sort(logits)[-2:]
  return dict(position=i, gap=float(top2[1] - top2[0]))


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for key, r in results.items():
    h = r["accept_hist"]
    axes[0].plot(range(len(h)), [x / max(1, sum(h)) for x in h], marker="o", label=key)
    axes[1].plot(range(1, len(r["n_alpha"]) + 1), r["n_alpha"], marker="o", label=key)
  axes[0].set(xlabel="draft tokens accepted per round", ylabel="fraction of rounds", title="Accepted length")
  axes[1].set(xlabel="depth", ylabel="acceptance rate", title="Acceptance by depth (n-alpha)", ylim=(0, 1))
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(_):
  import jax
  import jax.numpy as jnp

  from vsd_jax.decoding.runner import check_capacity, run_batches
  from vsd_jax.decoding.speculative import required_slots, speculative_generate
  from vsd_jax.decoding.autotune import choose_shape, explicit_shape, format_table
  from vsd_jax.decoding.vanilla import generate
  from vsd_jax.eval.metrics import summarize
  from vsd_jax.data.chat import prompt_encoder
  from vsd_jax.data.prompt_file import encode_prompt_items, read_prompt_file
  from vsd_jax.models.eagle3 import Eagle3Draft
  from vsd_jax import parallel
  from vsd_jax.weights import decoding_load_options, load_target
  from vsd_jax.weights.draft_io import load_draft

  cfg, F = _CONFIG.value, flags.FLAGS
  if not F.draft:
    sys.exit("error: --draft is required (the <workdir>/draft directory written by vsd_jax.train)")
  data_dir = F.data_dir or os.path.join(cfg.data.root, "eval", "eagle")
  out_dir = F.output_dir or os.path.join(cfg.workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  target = load_target(cfg.model.name, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       mesh=parallel.decode_mesh(cfg), rules=parallel.logical_axis_rules(cfg),
                       **decoding_load_options(cfg))
  dcfg, dparams, d2t, _ = load_draft(F.draft, target.config)
  draft = Eagle3Draft(dcfg)
  enc = prompt_encoder(target, cfg)  # config.data.chat_template, the pipeline's end-of-turn and pad ids
  eos, pad_id = enc.eos_ids, enc.pad_id
  benches = F.bench.split(",")
  bench_path = lambda b: b if b.endswith(".jsonl") else os.path.join(data_dir, b, "question.jsonl")  # noqa: E731
  tree_cfg, choice = explicit_shape(F.tree_depth, F.top_k, F.total_tokens, F.mode), None
  if tree_cfg is None:  # the shape measured fastest here, from text prompts the evaluation does not use
    calib = [enc.encode_user(m, cfg.generate.system_prompt)
             for b in benches for _, m, im in read_prompt_file(bench_path(b), with_images=True)[
                 F.num_prompts:F.num_prompts + F.calib_prompts] if not im]
    choice = choose_shape(target, draft, dparams, d2t, F.draft, calib, eos_ids=eos, pad_id=pad_id,
                          precision=F.precision, cache_path=F.autotune_cache, retune=F.retune, fallback=True)
    print(choice.describe() + "\n" + format_table(choice.table), file=sys.stderr)
    tree_cfg = choice.shape
  n = F.max_new_tokens
  max_pos = min(cfg.model.max_positions, target.config.max_position_embeddings)
  temps = [float(t) for t in F.temperature.split(",")]
  results, mismatches = {}, {}
  for bench in benches:
    path = bench_path(bench)
    bench = os.path.splitext(os.path.basename(bench))[0] if bench.endswith(".jsonl") else bench
    items = read_prompt_file(path, with_images=True, image_folder=F.image_folder)[:F.num_prompts]
    encoded = encode_prompt_items(target, enc, items, cfg.generate.system_prompt, path)
    prompts, images = encoded.ids, encoded.images  # images: a multimodal set's image files per prompt, else None
    px = lambda rows: None if rows is None else jnp.asarray(encoded.pixel_values(rows))  # noqa: E731
    for p in prompts:
      check_capacity([len(p)], n, max_pos, extra=required_slots(0, 0, tree_cfg))
    for temp in temps:
      key = jax.random.PRNGKey(F.seed)

      def vcall(ids, lens, rows=None):
        o = generate(target.model, target.params, jnp.asarray(ids), jnp.asarray(lens), key, temp, max_new_tokens=n,
                     cache_slots=check_capacity(lens, n, max_pos), eos_ids=eos, pad_id=pad_id,
                     precision=F.precision, pixel_values=px(rows))
        return o.tokens, o.num_new, o.rounds

      def scall(ids, lens, rows=None):
        slots = required_slots(ids.shape[1], n, tree_cfg)
        slots = -(-slots // 128) * 128
        o = speculative_generate(target.model, target.params, draft, dparams, jnp.asarray(d2t), jnp.asarray(ids),
                                 jnp.asarray(lens), key, tree_cfg=tree_cfg, max_new_tokens=n, cache_slots=slots,
                                 eos_ids=eos, temperature=temp, pad_id=pad_id, precision=F.precision,
                                 pixel_values=px(rows))
        return o.tokens, o.num_new, o.rounds, o.accept_hist

      van = run_batches(prompts, 1, vcall, pad_id, extras=images)
      spec = run_batches(prompts, 1, scall, pad_id, extras=images)
      name = f"{bench}@T={temp:g}"
      results[name] = summarize(van, spec)
      if temp == 0:
        mismatches[name] = [dict(question_id=items[i][0], **first_mismatch_gap(
            target, prompts[i], v.output_ids, s.output_ids, F.precision, px(None if images is None else [images[i]])))
                            for i, (v, s) in enumerate(zip(van, spec)) if v.output_ids != s.output_ids]
      r = results[name]
      print(f"{name}: tau {r['tau']:.2f} speedup {r['speedup']:.2f}x identical {r['identical_outputs']}/{r['prompts']}",
            file=sys.stderr)
  meta = dict(draft=F.draft, tree=dataclasses.asdict(tree_cfg),
              autotune=None if choice is None else dict(cached=choice.cached, key=choice.key,
                                                        predicted_speedup=choice.predicted_speedup, table=choice.table),
              max_new_tokens=n, num_prompts=F.num_prompts, precision=F.precision, jax=jax.__version__,
              device=str(jax.devices()[0]))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(dict(meta=meta, results=results, t0_mismatches=mismatches), f, indent=1)
  lines = ["| set | T | tau | n-alpha (depth 1..) | vanilla tok/s | spec tok/s | speedup | identical |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    bench, temp = name.split("@T=")
    alpha = " ".join(f"{a:.2f}" for a in r["n_alpha"])
    lines.append(f"| {bench} | {temp} | {r['tau']:.2f} | {alpha} | {r['vanilla_tok_per_s']:.1f} | "
                 f"{r['spec_tok_per_s']:.1f} | {r['speedup']:.2f}x | {r['identical_outputs']}/{r['prompts']} |")
  md = "\n".join(lines)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md + "\n")
  plot(results, os.path.join(out_dir, "acceptance.png"))
  print(md)
  if any(mismatches.values()):
    print("T=0 mismatches (first differing token, target logit gap):", json.dumps(mismatches), file=sys.stderr)


if __name__ == "__main__":
  run_app(main)

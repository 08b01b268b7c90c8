"""Vanilla vs speculative decoding on the EAGLE evaluation sets, same process, same prompts.

  python -m vsd_jax.evaluate --config configs/tiny.py --draft runs/tiny/draft \
      --bench mt_bench,humaneval,gsm8k,alpaca,sum,qa --data_dir ../shared/data/eval/eagle \
      --temperature 0,1 --num_prompts 10 --max_new_tokens 128 --output_dir runs/tiny/eval

Per set and temperature: tau (new tokens / target forwards), n-alpha (acceptance by depth), tokens/s of
both, speedup; at T=0 the outputs are compared token for token and any mismatch is explained by the
target's logit gap at the first differing token. --precision highest makes every matmul of both decoders
full float32 (XLA's GPU default for float32 is TF32), for outputs identical to vanilla on GPUs too. Writes
results.json, results.md and plots. Prompts are encoded, and decoding stops, as in training
(config.data.chat_template; data/chat.py prompt_encoder). --temperature and --max_new_tokens default to
config.generate's, as in generate; config.generate.top_p applies too.

The shape (unless --mode/--tree_depth/--top_k/--total_tokens fix it) is measured on text prompts of each set after
the first --num_prompts (never the scored ones); when no set has any left, on the prompts shipped for calibration
(vsd_jax/data/calibration_prompts.jsonl), and results.json's meta.calibration says which. Every flag is checked
before the target loads; results.json is rewritten (atomically) after every finished set and temperature, and a rerun
with the same settings and --output_dir decodes only what is missing.
The target is read straight into its shardings on config.mesh's fsdp x tensor devices (parallel.decode_mesh;
one device with the default mesh).

Multimodal sets (a LLaVA target, e.g. configs/llava.py): question.jsonl lines may carry "image" (a path or a
list; relative to the set's folder or --image_folder; `pkg:<package>/<path>` for a file a package ships) with
`<image>` placeholders in the first turn (none: "<image>\n" in front). Both decoders prefill with the images
(the checkpoint's own processor prepares them), then decode as for text.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from vsd_jax.cli_config import define_config_flag, define_decoding_shape_flags, run_app
from vsd_jax.decoding.precision import PRECISIONS
from vsd_jax.errors import InputNotFoundError, UserError
from vsd_jax.resolved import resolve
# The engine, weights and data modules are imported in main: a bad flag or config field fails before they load.

_CONFIG = define_config_flag()
flags.DEFINE_string("draft", None, "Trained draft directory (<workdir>/draft of `vsd_jax.train`).")
flags.DEFINE_string("bench", "mt_bench,humaneval,gsm8k,alpaca,sum,qa", "Comma-separated EAGLE sets (names under "
                    "--data_dir), or paths of question.jsonl files (ending in .jsonl), e.g. the offline image set "
                    "vsd_jax/data/sample_images_questions.jsonl.")
flags.DEFINE_string("data_dir", None, "Folder holding <bench>/question.jsonl (default <data.root>/eval/eagle).")
flags.DEFINE_string("temperature", None, "Comma-separated temperatures (default: config.generate.temperature).")
flags.DEFINE_integer("num_prompts", 10, "First N prompts of each set.")
flags.DEFINE_integer("max_new_tokens", None, "New tokens per prompt (default: config.generate.max_new_tokens).")
define_decoding_shape_flags()
flags.DEFINE_integer("calib_prompts", 2, "Autotuned shape: prompts of each set after the first --num_prompts (so "
                     "never the evaluated ones) whose greedy continuations measure the draft's acceptance.")
flags.DEFINE_string("output_dir", None, "Where results go (default <workdir>/eval).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("image_folder", "", "Folder of relative image paths in question.jsonl (default: its folder).")
flags.DEFINE_enum("precision", None, PRECISIONS, "Matmul precision of target and draft in both decoders (default: "
                  "JAX's, TF32 for float32 on GPUs); 'highest' = full float32, for T=0 output identical to vanilla.")


def bench_files(benches, data_dir) -> dict:
  """{set name: question.jsonl} for --bench; a missing one is an error naming it and the sets that exist."""
  files = {}
  for b in benches:
    path = b if b.endswith(".jsonl") else os.path.join(data_dir, b, "question.jsonl")
    if not os.path.isfile(path):
      have = sorted(d for d in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, d, "question.jsonl"))) \
          if os.path.isdir(data_dir) else []
      raise InputNotFoundError(f"--bench {b!r}: no file {path!r}; sets under --data_dir {data_dir!r}: "
                              f"{', '.join(have) or 'none'} (or pass a question.jsonl path)")
    files[os.path.splitext(os.path.basename(b))[0] if b.endswith(".jsonl") else b] = path
  return files


def main(_):
  from vsd_jax.data.prompt_file import read_prompt_file
  from vsd_jax.decoding.autotune import format_table
  from vsd_jax.engine import Engine, Sampling, check_decoding_values, explicit_shape
  from vsd_jax.eval.files import check_draft_dir, check_output_dir, read_json, settings_mismatch, write_json_atomic
  from vsd_jax.eval.metrics import summarize
  from vsd_jax.eval.report import write_report

  cfg, F = _CONFIG.value, flags.FLAGS
  if not F.draft:
    raise UserError("--draft is required: pass the <workdir>/draft directory written by vsd_jax.train")
  check_draft_dir(F.draft)
  g = resolve(cfg).decode  # config.generate, checked
  try:
    temps = [float(t) for t in (str(g.temperature) if F.temperature is None else F.temperature).split(",")]
  except ValueError as e:
    raise UserError(f"--temperature={F.temperature!r} is not a comma-separated list of numbers; e.g. 0,1") from e
  n = g.max_new_tokens if F.max_new_tokens is None else F.max_new_tokens
  samplings = {t: Sampling(max_new_tokens=n, temperature=t, top_p=g.top_p, seed=F.seed) for t in temps}
  check_decoding_values(num_prompts=F.num_prompts, calib_prompts=F.calib_prompts)
  shape = explicit_shape(F.tree_depth, F.top_k, F.total_tokens, F.mode)
  out_dir = F.output_dir or os.path.join(cfg.workdir, "eval")
  check_output_dir(out_dir, "--output_dir")
  os.makedirs(out_dir, exist_ok=True)
  files = bench_files(F.bench.split(","), F.data_dir or os.path.join(cfg.data.root, "eval", "eagle"))
  sets = {b: read_prompt_file(p, with_images=True, image_folder=F.image_folder) for b, p in files.items()}
  settings = dict(draft=os.path.abspath(F.draft), model=cfg.model.name, num_prompts=F.num_prompts, max_new_tokens=n,
                  top_p=g.top_p, seed=F.seed, precision=F.precision, image_folder=F.image_folder)
  results_path = os.path.join(out_dir, "results.json")
  saved = read_json(results_path) or {}
  fix = f"pass another --output_dir, or delete {results_path!r} to evaluate again"
  if saved:
    settings_mismatch(saved["meta"].get("settings", {}), settings, results_path, fix)

  engine = Engine(cfg, F.draft, shape, precision=F.precision)
  encoded = {b: engine.encode(items[:F.num_prompts], files[b]) for b, items in sets.items()}  # images: .images
  names = {b: [f"prompt {it[0]!r} of {files[b]}" for it in items[:F.num_prompts]] for b, items in sets.items()}
  for b in sets:  # every prompt fits (the draft's slots are counted once the shape is known)
    engine.check_capacity(encoded[b].ids, n, names[b], False)
  engine.resolve_shape([it for items in sets.values() for it in items[F.num_prompts:F.num_prompts + F.calib_prompts]],
                       F.calib_prompts * len(sets), origin=", ".join(files.values()), cache_path=F.autotune_cache,
                       retune=F.retune)
  if engine.choice is not None:
    print(format_table(engine.choice.table), file=sys.stderr)
  meta = dict(engine.metadata(), settings=settings, max_new_tokens=n, num_prompts=F.num_prompts, top_p=g.top_p)
  results, mismatches = saved.get("results", {}), saved.get("t0_mismatches", {})
  if results:
    settings_mismatch(dict(tree=saved["meta"].get("tree")), dict(tree=meta["tree"]), results_path, fix)
    print(f"resuming {results_path}: {', '.join(results)} already evaluated", file=sys.stderr)
  for bench, items in sets.items():
    if all(f"{bench}@T={t:g}" in results for t in temps):
      continue
    engine.check_capacity(encoded[bench].ids, n, names[bench], True)
    for temp in temps:
      name = f"{bench}@T={temp:g}"
      if name in results:
        continue
      van = engine.vanilla(encoded[bench], samplings[temp])
      spec = engine.speculative(encoded[bench], samplings[temp])
      results[name] = summarize(van, spec)
      if temp == 0:
        mismatches[name] = engine.t0_mismatches(encoded[bench], [it[0] for it in items], van, spec)
      write_json_atomic(results_path, dict(meta=meta, results=results, t0_mismatches=mismatches))
      r = results[name]
      print(f"{name}: tau {r['tau']:.2f} speedup {r['speedup']:.2f}x identical {r['identical_outputs']}/{r['prompts']}",
            file=sys.stderr)
  print(write_report(results, out_dir))
  if any(mismatches.values()):
    print("T=0 mismatches (first differing token, target logit gap):", json.dumps(mismatches), file=sys.stderr)


if __name__ == "__main__":
  run_app(main)

"""Generate with the target (vanilla) from a prompt file; one JSON line per prompt.

  python -m vsd_jax.generate --config configs/tiny.py --prompts FILE --max_new_tokens N \
      --temperature T --output OUT.jsonl

FILE: EAGLE `question.jsonl` (`question_id`, `turns`; the first turn is the user message) or plain text,
one prompt per line. The chat template (config.data.chat_template, else the tokenizer's own) is applied
with the generation prompt, and decoding stops on the data pipeline's end-of-turn ids (data/chat.py
prompt_encoder). Each output line has
question_id (or line index), prompt_ids, output_ids (new tokens, EOS included when produced), text,
new_tokens, wall_time (seconds of the batch holding this prompt, compilation excluded) and rounds
(target forward passes after prefill).

Image prompts (a LLaVA target, e.g. --config configs/llava.py:tiny): question.jsonl lines with an "image" field
(as vsd_jax.evaluate reads them), or --image FILE (repeatable; `pkg:<package>/<path>` for a file a package ships):
one image goes with every prompt, as many as prompts one per prompt, any number with a single prompt; each image
fills an <image> placeholder of its prompt (none: "<image>\n" in front, LLaVA's convention). The checkpoint's own
processor prepares the pixels; both decoders prefill with them. Output lines of image prompts add `images`.

With --draft DIR (from `vsd_jax.train`) decoding is speculative; `rounds` then counts verification forwards, so
tau = new_tokens / rounds. The draft's shape (chain or tree, depth, branching, verified tokens) is the one measured
fastest on this device for this target and draft (vsd_jax.engine: the first --calib_prompts text prompts'
greedy continuations give the acceptance -- the prompts shipped for calibration when all are image prompts --, the
device the costs; cached, --retune to measure again), unless any of --mode/--tree_depth/--top_k/--total_tokens is
given. When no measured shape is predicted faster than vanilla decoding on this device at this batch size, generate
decodes without the draft and says so (a fixed shape always speculates); evaluate, which measures the comparison,
speculates with the best shape anyway.

Every flag is checked before the target loads. Each finished batch is appended to --output at once; a rerun with
the same --output and settings skips the prompts already there (OUT.meta.json holds the settings, the decoding
shape and which prompts calibrated it); when all are done the file is rewritten in prompt order.
--precision highest makes every matmul full float32 (XLA's GPU default for float32 is TF32).

The target is read straight into its shardings on config.mesh's fsdp x tensor devices (parallel.decode_mesh;
one device with the default mesh).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from vsd_jax.cli_config import define_config_flag, define_decoding_shape_flags, run_app
from vsd_jax.decoding.precision import PRECISIONS
from vsd_jax.errors import UserError
from vsd_jax.resolved import resolve
# The engine, weights and data modules are imported in main: a bad flag or config field fails before they load.

_CONFIG = define_config_flag()
flags.DEFINE_string("prompts", None, "EAGLE question.jsonl or a text file with one prompt per line.")
flags.DEFINE_string("output", None, "Output JSONL path (appended batch by batch; a rerun resumes).")
flags.DEFINE_multi_string("image", [], "Image file for the prompts (LLaVA targets; repeatable): one for every "
                          "prompt, one per prompt, or several for a single prompt.")
flags.DEFINE_integer("max_new_tokens", None, "New tokens per prompt (default: config.generate.max_new_tokens).")
flags.DEFINE_float("temperature", None, "0 = greedy (default: config.generate.temperature).")
flags.DEFINE_float("top_p", None, "Nucleus mass (default: config.generate.top_p).")
flags.DEFINE_integer("batch_size", None, "Prompts per batch (default: config.generate.batch_size).")
flags.DEFINE_integer("limit", None, "Use only the first N prompts.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("draft", None, "Trained draft directory: decode speculatively (lossless) with it.")
define_decoding_shape_flags()
flags.DEFINE_integer("calib_prompts", 4, "With --draft and no shape given: the first N text prompts measure the "
                     "draft's acceptance for the autotuned shape (once per device, target and draft; cached).")
flags.DEFINE_enum("precision", None, PRECISIONS, "Matmul precision of target and draft (default: JAX's, TF32 "
                  "for float32 on GPUs); 'highest' = full float32, for T=0 output identical to vanilla.")


def main(_):
  from tqdm import tqdm

  from vsd_jax.data.prompt_file import attach_images, check_image_files, read_prompt_file
  from vsd_jax.engine import Engine, Sampling, check_decoding_values, explicit_shape
  from vsd_jax.eval.files import JsonlOutput, check_draft_dir, check_output_file

  cfg, F = _CONFIG.value, flags.FLAGS
  if F.prompts is None or F.output is None:
    raise UserError("--prompts and --output are required: pass --prompts FILE (question.jsonl or one prompt per "
                     "line) and --output OUT.jsonl")
  g = resolve(cfg).decode  # config.generate, checked
  given = lambda flag, default: default if flag is None else flag  # noqa: E731  (0 is a value, not "unset")
  sampling = Sampling(max_new_tokens=given(F.max_new_tokens, g.max_new_tokens),
                      temperature=given(F.temperature, g.temperature), top_p=given(F.top_p, g.top_p),
                      batch_size=given(F.batch_size, g.batch_size), seed=F.seed)
  check_decoding_values(limit=F.limit, calib_prompts=F.calib_prompts)
  shape = explicit_shape(F.tree_depth, F.top_k, F.total_tokens, F.mode)
  check_output_file(F.output, "--output")
  if F.draft:
    check_draft_dir(F.draft)
  items = attach_images(read_prompt_file(F.prompts, with_images=True)[:F.limit], F.image)
  check_image_files(items)  # a bad image file fails here, before the target loads
  settings = dict(prompts=os.path.abspath(F.prompts), limit=F.limit, images=list(F.image), model=cfg.model.name,
                  max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                  seed=F.seed, draft=F.draft and os.path.abspath(F.draft), precision=F.precision)
  out = JsonlOutput(F.output, settings)  # other settings than the rows there: an error, before loading

  engine = Engine(cfg, F.draft, shape, precision=F.precision)
  encoded = engine.encode(items, F.prompts)  # image prompts: the image tokens expanded, encoded.images their files
  keys = [out.key(it[0], ids) for it, ids in zip(items, encoded.ids)]
  todo = [i for i, k in enumerate(keys) if k not in out.finished]
  names = [f"prompt {items[i][0]!r} of {F.prompts}" for i in todo]
  engine.check_capacity([encoded.ids[i] for i in todo], sampling.max_new_tokens, names, False)  # before measuring
  if todo:
    engine.resolve_shape(items, F.calib_prompts, origin=F.prompts, batch=sampling.batch_size,
                         cache_path=F.autotune_cache, retune=F.retune)
    if engine.draft is not None and not engine.speculating:  # never decode slower than without the draft
      print(f"decoding without the draft: on this device at batch {sampling.batch_size} no draft shape is predicted "
            "faster than vanilla decoding (T=0 acceptance of the calibration prompts against measured costs); fix a "
            "shape with --mode/--tree_depth/--top_k/--total_tokens to speculate anyway", file=sys.stderr)
    engine.check_capacity([encoded.ids[i] for i in todo], sampling.max_new_tokens, names)  # with the draft's slots
    out.start(dict(engine.metadata(), batch_size=sampling.batch_size))  # the batch the shape was chosen for
  if len(todo) < len(items):
    print(f"resuming {F.output}: {len(items) - len(todo)} of {len(items)} prompts already generated", file=sys.stderr)
  tok = engine.target.tokenizer

  def write(indices, generations):
    rows = []
    for j, r in zip(indices, generations):
      qid, _, images = items[todo[j]]
      row = dict(question_id=qid, prompt_ids=r.prompt_ids, output_ids=r.output_ids,
                 text=tok.decode(r.output_ids, skip_special_tokens=True), new_tokens=r.new_tokens,
                 wall_time=r.wall_time, rounds=r.rounds)
      rows.append(dict(row, images=list(images)) if images else row)
    out.append(rows)

  with tqdm(total=len(todo), desc="generate", file=sys.stderr) as bar:
    if todo:
      engine.generate(encoded.subset(todo), sampling, on_batch=write, progress=bar.update)
  rows = out.finish(keys)
  total_tokens = sum(r["new_tokens"] for r in rows)
  print(f"wrote {len(rows)} generations ({total_tokens} new tokens) to {F.output}", file=sys.stderr)


if __name__ == "__main__":
  run_app(main)

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
fastest on this device for this target and draft (vsd_jax.decoding.autotune: the first --calib_prompts prompts'
greedy continuations give the acceptance, the device the costs; cached, --retune to measure again), unless any of
--mode/--tree_depth/--top_k/--total_tokens is given. When no measured shape is predicted faster than vanilla
decoding on this device at this batch size, generate decodes without the draft and says so (a fixed shape always
speculates); evaluate, which measures the comparison, speculates with the best shape anyway.
--precision highest makes every matmul full float32 (XLA's GPU default for float32 is TF32).

The target is read straight into its shardings on config.mesh's fsdp x tensor devices (parallel.decode_mesh;
one device with the default mesh).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from vsd_jax.cli_config import define_config_flag, define_decoding_shape_flags, run_app
from vsd_jax.decoding.precision import PRECISIONS

_CONFIG = define_config_flag()
flags.DEFINE_string("prompts", None, "EAGLE question.jsonl or a text file with one prompt per line.")
flags.DEFINE_string("output", None, "Output JSONL path.")
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
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from vsd_jax.decoding.runner import check_capacity, run_batches
  from vsd_jax.data.chat import prompt_encoder
  from vsd_jax.data.prompt_file import attach_images, check_image_files, encode_prompt_items, read_prompt_file
  from vsd_jax.decoding.vanilla import generate
  from vsd_jax import parallel
  from vsd_jax.weights import decoding_load_options, load_target

  cfg = _CONFIG.value
  if flags.FLAGS.prompts is None or flags.FLAGS.output is None:
    sys.exit("error: --prompts and --output are required")
  g = cfg.generate
  max_new = flags.FLAGS.max_new_tokens or g.max_new_tokens
  temperature = g.temperature if flags.FLAGS.temperature is None else flags.FLAGS.temperature
  top_p = flags.FLAGS.top_p or g.top_p
  batch_size = flags.FLAGS.batch_size or g.batch_size

  items = read_prompt_file(flags.FLAGS.prompts, with_images=True)[:flags.FLAGS.limit]
  items = attach_images(items, flags.FLAGS.image)
  check_image_files(items)  # a bad image file fails here, before the target loads
  target = load_target(cfg.model.name, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       mesh=parallel.decode_mesh(cfg), rules=parallel.logical_axis_rules(cfg),
                       **decoding_load_options(cfg))
  tok = target.tokenizer
  enc = prompt_encoder(target, cfg)  # config.data.chat_template, the pipeline's end-of-turn and pad ids
  encoded = encode_prompt_items(target, enc, items, g.system_prompt, flags.FLAGS.prompts)
  prompts = encoded.ids  # image prompts: the image tokens expanded, encoded.images their files
  px = lambda rows: None if rows is None else jnp.asarray(encoded.pixel_values(rows))  # noqa: E731
  max_pos = min(cfg.model.max_positions, target.config.max_position_embeddings)
  names = [f"prompt {it[0]!r} of {flags.FLAGS.prompts}" for it in items]
  for i in range(len(prompts)):  # check every prompt, so the error names the one at fault
    check_capacity([len(prompts[i])], max_new, max_pos, names=[names[i]])
  pad_id, eos = enc.pad_id, enc.eos_ids
  rng = jax.random.PRNGKey(flags.FLAGS.seed)

  def call(ids, lens, rows=None):
    slots = check_capacity(lens, max_new, max_pos)
    out = generate(target.model, target.params, jnp.asarray(ids), jnp.asarray(lens), rng, temperature,
                   max_new_tokens=max_new, cache_slots=slots, eos_ids=eos, top_p=top_p, pad_id=pad_id,
                   precision=flags.FLAGS.precision, pixel_values=px(rows))
    return out.tokens, out.num_new, out.rounds

  tree_cfg = None  # vanilla decoding, unless a draft is given and speculating pays
  if flags.FLAGS.draft:
    from vsd_jax.decoding.speculative import required_slots, speculative_generate
    from vsd_jax.decoding.autotune import choose_shape, explicit_shape
    from vsd_jax.models.eagle3 import Eagle3Draft
    from vsd_jax.weights.draft_io import load_draft
    F = flags.FLAGS
    dcfg, dparams, d2t, _ = load_draft(F.draft, target.config)
    draft = Eagle3Draft(dcfg)
    tree_cfg = explicit_shape(F.tree_depth, F.top_k, F.total_tokens, F.mode)
    if tree_cfg is None:  # the shape measured fastest on this device (cached per device, target and draft)
      calib = [p for p, it in zip(prompts, items) if not it[2]][:F.calib_prompts]
      choice = choose_shape(target, draft, dparams, d2t, F.draft, calib, eos_ids=eos, pad_id=pad_id,
                            batch=batch_size, precision=F.precision, cache_path=F.autotune_cache, retune=F.retune,
                            fallback=True)
      print(choice.describe(), file=sys.stderr)
      tree_cfg = choice.shape
      if not choice.pays:  # a serving engine's rule: never decode slower than without the draft
        print(f"decoding without the draft: on this device at batch {batch_size} no draft shape is predicted faster "
              "than vanilla decoding (T=0 acceptance of the calibration prompts against measured costs); fix a "
              "shape with --mode/--tree_depth/--top_k/--total_tokens to speculate anyway", file=sys.stderr)
        tree_cfg = None
  if tree_cfg is not None:
    extra = required_slots(0, 0, tree_cfg)
    for i in range(len(prompts)):
      check_capacity([len(prompts[i])], max_new, max_pos, extra=extra, names=[names[i]])

    def call(ids, lens, rows=None):  # noqa: F811  (speculative replaces vanilla)
      slots = -(-required_slots(ids.shape[1], max_new, tree_cfg) // 128) * 128
      out = speculative_generate(target.model, target.params, draft, dparams, jnp.asarray(d2t), jnp.asarray(ids),
                                 jnp.asarray(lens), rng, tree_cfg=tree_cfg, max_new_tokens=max_new,
                                 cache_slots=slots, eos_ids=eos, temperature=temperature, top_p=top_p,
                                 pad_id=pad_id, precision=F.precision, pixel_values=px(rows))
      return out.tokens, out.num_new, out.rounds

  with tqdm(total=len(prompts), desc="generate", file=sys.stderr) as bar:
    results = run_batches(prompts, batch_size, call, pad_id, progress=bar.update, extras=encoded.images)
  os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.output)), exist_ok=True)
  with open(flags.FLAGS.output, "w") as f:
    for (qid, _, images), r in zip(items, results):
      row = dict(question_id=qid, prompt_ids=r.prompt_ids, output_ids=r.output_ids,
                 text=tok.decode(r.output_ids, skip_special_tokens=True), new_tokens=r.new_tokens,
                 wall_time=r.wall_time, rounds=r.rounds)
      f.write(json.dumps(dict(row, images=list(images)) if images else row) + "\n")
  total_tokens = sum(r.new_tokens for r in results)
  print(f"wrote {len(results)} generations ({total_tokens} new tokens) to {flags.FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  run_app(main)

"""Convert drafts between vsd_jax and the EAGLE-3 checkpoint format of SGLang, vLLM and SpecForge.

  python -m vsd_jax.convert_draft --input <workdir>/draft --to eagle3 --output eagle3_draft/
  python -m vsd_jax.convert_draft --input eagle3_draft/ --to vsd_jax --target smollm2-135m-instruct \
      --output my_draft/

--to eagle3 reads a draft directory written by `vsd_jax.train` (draft.msgpack, draft_config.json,
vocab.npz) and writes config.json + model.safetensors that SGLang (--speculative-draft-model-path), vLLM
(speculative_config method "eagle3") and SpecForge load. --to vsd_jax reads such a checkpoint
(safetensors or pytorch_model.bin) and writes our draft directory for the target named by --target (a
registry name, GGUF file or HF directory; only its configuration is used): decode with
`python -m vsd_jax.generate --draft <output>`, continue training with `--config.draft.init_from=<output>`.
The format and its conventions are documented in `vsd_jax/weights/eagle3_format.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from vsd_jax.errors import DEBUG_ENV, InputNotFoundError, UserError, debug_requested, run_reporting
# The weights modules (and JAX with them) are imported where used: a bad argument fails before they load.


def target_config(name_or_path: str):
  """The LlamaConfig of a target (registry name, GGUF file or HF directory) without loading its weights
  where the format allows (HF directories: config.json only)."""
  from vsd_jax.weights.convert import config_from_hf_dict
  from vsd_jax.weights.registry import resolve

  kind, path = resolve(name_or_path)
  if kind == "hf_dir":
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise InputNotFoundError(f"target {name_or_path!r}: {path!r} has no config.json; pass an HF checkpoint "
                              "directory, a GGUF file or a registry name.")
    with open(cfg_path) as f:
      return config_from_hf_dict(json.load(f))
  from vsd_jax.weights.gguf_file import read_gguf
  return read_gguf(path)[0]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vsd_jax.convert_draft", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--input", required=True, help="vsd_jax draft directory (--to eagle3) or EAGLE-3 checkpoint "
                 "directory (--to vsd_jax).")
  p.add_argument("--to", required=True, choices=("eagle3", "vsd_jax"), help="Output format.")
  p.add_argument("--output", required=True, help="Output directory (created; an existing one that holds files is "
                 "replaced only with --overwrite).")
  p.add_argument("--target", default=None, help="Target model the draft is for (registry name, GGUF file or HF "
                 "directory). Required with --to vsd_jax; with --to eagle3 it checks the draft fits it.")
  p.add_argument("--overwrite", action="store_true", help="Replace an existing --output directory (as a whole: no "
                 "old file stays beside the new ones).")
  p.add_argument("--debug", action="store_true", help=f"Show the traceback of an input error (also: {DEBUG_ENV}=1).")
  return p


def _describe(directory: str) -> str:
  names = sorted(os.listdir(directory))
  kind = ("a vsd_jax draft" if "draft_config.json" in names else
          "an EAGLE-3 checkpoint" if "config.json" in names else f"{len(names)} file(s)")
  return f"{kind} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def check_paths(input_dir: str, to: str, output_dir: str, target: str = None, overwrite: bool = False) -> None:
  """Every path the conversion reads or writes, checked before anything loads; raises a UserError naming it."""
  from vsd_jax.weights.registry import model_entry

  want = "draft_config.json" if to == "eagle3" else "config.json"
  kind = "a vsd_jax draft directory (<workdir>/draft)" if to == "eagle3" else "an EAGLE-3 checkpoint directory"
  if not os.path.isdir(input_dir):
    raise InputNotFoundError(f"--input {input_dir!r} is not a directory; pass {kind}.")
  if not os.path.isfile(os.path.join(input_dir, want)):
    raise InputNotFoundError(f"--input {input_dir!r} has no {want}, so it is not {kind} (--to {to}).")
  if os.path.abspath(input_dir) == os.path.abspath(output_dir):
    raise UserError(f"--output {output_dir!r} is the input directory; write the conversion somewhere else.")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output {output_dir!r} is a file, not a directory; pass a directory path (it is created).")
  if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
    raise UserError(f"--output {output_dir!r} already holds {_describe(output_dir)}; pass --overwrite to replace "
                    "it, or choose another --output.")
  parent = os.path.dirname(os.path.abspath(output_dir))
  while not os.path.isdir(parent):  # the folder that exists, in which the missing ones would be created
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK):
    raise UserError(f"--output {output_dir!r}: the folder {parent!r} is not writable; choose another --output.")
  if to == "vsd_jax" and target is None:
    raise UserError("--to vsd_jax needs --target: the target model the EAGLE-3 draft was trained for "
                    "(registry name, GGUF file or HF directory).")
  if target is not None:
    model_entry(target)  # an unknown name or a missing file, before anything is read


def _replace_dir(new: str, output_dir: str) -> None:
  """Move the finished directory `new` to output_dir, replacing an existing one as a whole."""
  old = None
  if os.path.isdir(output_dir):
    old = f"{output_dir.rstrip(os.sep)}.replaced-{os.getpid()}"
    os.rename(output_dir, old)
  os.rename(new, output_dir)
  if old is not None:
    shutil.rmtree(old)


def convert(input_dir: str, to: str, output_dir: str, target: str = None, overwrite: bool = False) -> str:
  """The CLI's work as a function; returns a one-line summary. Raises on bad input (messages name the fix).

  The conversion is written to a temporary directory beside output_dir and moved into place when complete, so
  an interrupted run leaves output_dir as it was (and --overwrite never mixes old and new files)."""
  from vsd_jax.weights import eagle3_format
  from vsd_jax.weights.draft_io import load_draft

  check_paths(input_dir, to, output_dir, target, overwrite)
  tmp = f"{output_dir.rstrip(os.sep)}.partial-{os.getpid()}"
  os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
  try:
    if to == "eagle3":
      if target is not None:
        load_draft(input_dir, target_config(target))  # raises DraftMismatchError naming the difference
      eagle3_format.export_eagle3(input_dir, tmp)
      summary = (f"wrote EAGLE-3 checkpoint {output_dir} (config.json, model.safetensors); serve it with SGLang "
                 "--speculative-algorithm EAGLE3 or vLLM speculative_config method 'eagle3'")
    else:
      eagle3_format.import_eagle3(input_dir, tmp, target_config(target))
      summary = (f"wrote vsd_jax draft {output_dir}; decode with `python -m vsd_jax.generate --draft {output_dir}`, "
                 f"continue training with --config.draft.init_from={output_dir}")
    _replace_dir(tmp, output_dir)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return summary


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  print(run_reporting(convert, args.input, args.to, args.output, args.target, args.overwrite,
                      debug=args.debug or debug_requested([])))
  return 0


if __name__ == "__main__":
  sys.exit(main())

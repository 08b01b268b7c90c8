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
import sys


def target_config(name_or_path: str):
  """The LlamaConfig of a target (registry name, GGUF file or HF directory) without loading its weights
  where the format allows (HF directories: config.json only)."""
  from vsd_jax.weights.convert import config_from_hf_dict
  from vsd_jax.weights.registry import resolve

  kind, path = resolve(name_or_path)
  if kind == "hf_dir":
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"target {name_or_path!r}: {path!r} has no config.json; pass an HF checkpoint "
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
  p.add_argument("--output", required=True, help="Output directory (created; files in it are overwritten).")
  p.add_argument("--target", default=None, help="Target model the draft is for (registry name, GGUF file or HF "
                 "directory). Required with --to vsd_jax; with --to eagle3 it checks the draft fits it.")
  return p


def convert(input_dir: str, to: str, output_dir: str, target: str = None) -> str:
  """The CLI's work as a function; returns a one-line summary. Raises on bad input (messages name the fix)."""
  from vsd_jax.weights import eagle3_format
  from vsd_jax.weights.draft_io import load_draft

  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f"--input {input_dir!r} is not a directory; pass a draft directory.")
  if os.path.abspath(input_dir) == os.path.abspath(output_dir):
    raise ValueError(f"--output {output_dir!r} is the input directory; write the conversion somewhere else.")
  if to == "eagle3":
    if target is not None:
      load_draft(input_dir, target_config(target))  # raises DraftMismatchError naming the difference
    eagle3_format.export_eagle3(input_dir, output_dir)
    return (f"wrote EAGLE-3 checkpoint {output_dir} (config.json, model.safetensors); serve it with SGLang "
            "--speculative-algorithm EAGLE3 or vLLM speculative_config method 'eagle3'")
  if target is None:
    raise ValueError("--to vsd_jax needs --target: the target model the EAGLE-3 draft was trained for "
                     "(registry name, GGUF file or HF directory).")
  eagle3_format.import_eagle3(input_dir, output_dir, target_config(target))
  return (f"wrote vsd_jax draft {output_dir}; decode with `python -m vsd_jax.generate --draft {output_dir}`, "
          f"continue training with --config.draft.init_from={output_dir}")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    print(convert(args.input, args.to, args.output, args.target))
  except (ValueError, FileNotFoundError, ImportError) as e:  # Eagle3FormatError/DraftMismatchError: ValueError
    sys.exit(f"error: {e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

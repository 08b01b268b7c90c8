"""Input paths checked before any model loads, and outputs written as work finishes (resumable, atomic).

generate appends each finished batch to its JSONL (`JsonlOutput`), next to a `<output>.meta.json` with the settings
that shape the rows; a rerun with the same output and settings skips the prompts already there. evaluate keeps
results.json complete after every finished entry (`write_json_atomic`: a temporary file renamed over it).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from vsd_jax.errors import InputNotFoundError, UserError


def check_output_file(path: str, flag: str) -> None:
  """The output file can be written: not a directory, its folder creatable and writable."""
  if os.path.isdir(path):
    raise UserError(f"{flag}={path!r} is a directory; pass a file path, e.g. {flag}={os.path.join(path, 'out.jsonl')}")
  _check_writable_folder(os.path.dirname(os.path.abspath(path)), flag, path)
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise UserError(f"{flag}={path!r} exists and is not writable; pass another path or fix its permissions")


def check_output_dir(path: str, flag: str) -> None:
  """The output folder is (or can be made) a writable directory."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path!r} is a file, not a directory; pass a directory path")
  _check_writable_folder(os.path.abspath(path), flag, path)


def _check_writable_folder(folder: str, flag: str, path: str) -> None:
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"{flag}={path!r}: cannot write under {existing!r} (not a writable directory); pass a path in a "
                     "writable folder")


def check_draft_dir(path: str, flag: str = "--draft") -> None:
  """A trained draft directory (vsd_jax.train's <workdir>/draft, or convert_draft --to vsd_jax's output)."""
  if not os.path.isdir(path):
    raise InputNotFoundError(f"{flag}={path!r} is not a directory; pass the <workdir>/draft folder written by "
                            "vsd_jax.train (or by vsd_jax.convert_draft --to vsd_jax)")
  if not os.path.isfile(os.path.join(path, "draft_config.json")):
    raise InputNotFoundError(f"{flag}={path!r} holds no draft_config.json, so it is not a trained draft; pass the "
                            "<workdir>/draft folder written by vsd_jax.train (or by vsd_jax.convert_draft)")


def write_json_atomic(path: str, obj) -> None:
  """Write JSON to a temporary file next to `path`, then rename it over `path`: a reader (or a kill) never sees a
  half-written file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_json(path: str) -> Optional[dict]:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def settings_mismatch(saved: dict, wanted: dict, what: str, fix: str) -> None:
  """UserError naming the first setting in which a resumable output's saved settings differ from this run's."""
  for k in sorted(set(saved) | set(wanted)):
    if saved.get(k) != wanted.get(k):
      raise UserError(f"{what} was written with {k}={saved.get(k)!r} and this run asks for {k}={wanted.get(k)!r}; "
                       f"{fix}")


class JsonlOutput:
  """A JSONL output written batch by batch: rows appended as they finish, a rerun resumes.

  settings: what shapes the rows (kept in `<path>.meta.json`); a rerun with other settings is an error naming the
  first difference. `finished` maps each written row's key (question_id, prompt_ids) to the row. A torn last line (a
  kill mid-write) is dropped with a warning; `finish(order)` rewrites the file atomically in input order.
  """

  def __init__(self, path: str, settings: dict, flag: str = "--output"):
    self.path, self.meta_path, self.settings = path, path + ".meta.json", settings
    self.finished: dict = {}
    meta = read_json(self.meta_path)
    if meta is None:
      if os.path.exists(path):
        raise UserError(f"{flag}={path!r} exists but has no {os.path.basename(self.meta_path)} (it was not written by "
                         "a resumable generate run); pass another path or delete the file")
      return
    settings_mismatch(meta.get("settings", {}), settings, f"{flag}={path!r}",
                      f"pass another {flag}, or delete {path!r} and {self.meta_path!r} to start again")
    if not os.path.isfile(path):
      return
    with open(path) as f:
      lines = f.read().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        if n != len(lines):
          raise UserError(f"{path}:{n} is not JSON ({e}); delete the file (and {self.meta_path}) to start "
                           "again") from e
        print(f"{path}: dropping a cut-off last line (a run stopped while writing it); its prompt is generated "
              "again", file=sys.stderr)
    self.finished = {self.key(r["question_id"], r["prompt_ids"]): r for r in rows}
    self._rewrite(rows)  # without the torn line, so appended rows start on a line of their own

  @staticmethod
  def key(question_id, prompt_ids) -> tuple:
    return json.dumps(question_id), tuple(prompt_ids)

  def start(self, meta: dict) -> None:
    """Record the settings (and what else describes the run, e.g. the decoding shape) before the first row."""
    write_json_atomic(self.meta_path, dict(meta, settings=self.settings))

  def append(self, rows) -> None:
    with open(self.path, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
        self.finished[self.key(row["question_id"], row["prompt_ids"])] = row
      f.flush()
      os.fsync(f.fileno())

  def finish(self, keys) -> list:
    """Rewrite the rows in the order of `keys` (every prompt's); -> the rows."""
    rows = [self.finished[k] for k in keys]
    self._rewrite(rows)
    return rows

  def _rewrite(self, rows) -> None:
    tmp = f"{self.path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, self.path)

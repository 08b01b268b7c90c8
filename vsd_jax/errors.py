"""Errors in what the user gave (a flag, a config field, a file), and the one way every CLI reports them.

Raise `UserError` (or a subclass) with a message that names the input and the fix, e.g.

    raise UserError(f"--max_new_tokens={n}: must be >= 1; pass a positive number of new tokens")
    raise InputNotFoundError(f"--draft {path!r} does not exist; pass the <workdir>/draft written by vsd_jax.train")

Every CLI (cli_config.run_app, convert_draft.main) prints such an error as `error: <message>` on stderr, without a
traceback, and exits with status 1; `--debug` or VSD_JAX_DEBUG=1 shows the traceback instead. Errors that are not
UserErrors are bugs (or the environment's) and keep their traceback. The project's own input errors
(ConfigError here; PromptFileError, PromptTooLongError, DraftMismatchError, DataSourceError, MeshError, ...) subclass
UserError. This module imports nothing heavy: CLIs use it before JAX starts.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

DEBUG_ENV = "VSD_JAX_DEBUG"


class UserError(ValueError):
  """A mistake in the user's input; the message names the input and the fix (one or two lines)."""


class InputNotFoundError(UserError, FileNotFoundError):
  """A path the user gave (a file, a draft directory) does not exist or is not of the right kind."""


class ConfigError(UserError):
  """A config file, field or `--config.x=v` override that cannot be used; the message names it and the fix."""


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
  """--debug on the command line or VSD_JAX_DEBUG set to anything but "", "0", "false", "no"."""
  argv = sys.argv if argv is None else argv
  env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
  return env or any(a in ("--debug", "--debug=true", "--debug=1") for a in argv)


def report(error: BaseException) -> None:
  """Exit the way every CLI reports a UserError: `error: <message>` and where the traceback is, on stderr, status 1
  (SystemExit with that text, so a caller of a CLI's main() can catch and match it)."""
  raise SystemExit(f"error: {error}\n(traceback: rerun with --debug or {DEBUG_ENV}=1)")


def run_reporting(fn: Callable, *args, debug: Optional[bool] = None, **kwargs):
  """fn(*args, **kwargs); a UserError is reported (see `report`) unless debug (default: debug_requested())."""
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    if debug_requested() if debug is None else debug:
      raise
    report(e)

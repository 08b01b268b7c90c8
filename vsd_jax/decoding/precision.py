"""Matmul precision of the decoding functions: XLA's default, or full float32 when exact output is asked for.

On GPUs, XLA's default computes float32 matmuls in TF32. Speculative verification (a forward over a tree)
and vanilla decoding (one token per step) then round the same logits differently. At a near-tie the T=0
argmax can differ: on an H200, 5 of 40 outputs differed from vanilla at the default, none at 'highest'.
'highest' makes every matmul traced inside `speculative_generate` / `vanilla.generate` full float32, in the
target and in the draft, and it costs speed. CPUs compute float32 matmuls in full precision at any setting,
so there both settings give the same tokens. The setting is a static argument, so it is part of the jit
cache key.
"""

from __future__ import annotations

import contextlib
from typing import Optional

PRECISIONS = ("default", "high", "highest")  # jax.lax.Precision names: fastest, bf16_3x/TF32, float32


def check_precision(precision: Optional[str]) -> Optional[str]:
  """precision, or ValueError naming the accepted values. None = JAX's ambient `jax_default_matmul_precision`."""
  if precision is not None and precision not in PRECISIONS:
    raise ValueError(f"matmul precision {precision!r} is not one of {', '.join(PRECISIONS)} (or None for JAX's "
                     "default); 'highest' = full float32 matmuls, for T=0 output identical to vanilla decoding")
  return precision


def matmul_precision(precision: Optional[str]):
  """Context manager: matmuls traced inside it use `precision` (None: leave JAX's setting as it is)."""
  import jax  # here, so that the CLIs can read PRECISIONS for their flags before JAX starts
  check_precision(precision)
  return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)

"""What one more verified token costs in the target's matmuls: x [M, K] times a weight, M = 1..4 rows, per layout.

  python benchmarks/matmul_rows.py            # the SmolLM2 shapes: MLP (x30 layers) and the vocabulary projection

A decode step multiplies one row by every weight; verifying a chain of depth d multiplies 1 + d rows. When the
step is bound by reading the weights, extra rows should be nearly free; this measures whether XLA's kernels on this
device make them so, for the weight stored [K, N] (`x @ W`, how Dense kernels and an untied lm_head are stored) and
[N, K] (`x @ W.T`, a tied embedding used as the vocabulary projection). Each figure is the best of --repeats calls
of one jitted program over --copies distinct weights (so they are read from memory, not cache).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def best_ms(f, *args, repeats):
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", default="1,2,3,4")
  ap.add_argument("--repeats", type=int, default=40)
  args = ap.parse_args()
  rows = [int(r) for r in args.rows.split(",")]
  shapes = [("MLP up/gate 576x1536, x30", 576, 1536, 30), ("MLP down 1536x576, x30", 1536, 576, 30),
            ("vocabulary 576x49152, x2", 576, 49152, 2)]
  layouts = {"[K, N]: x @ W": (lambda k, n: (k, n), lambda x, w: x @ w),
             "[N, K]: x @ W.T": (lambda k, n: (n, k), lambda x, w: x @ w.T)}
  rng = np.random.default_rng(0)
  print(f"{jax.devices()[0]}, jax {jax.__version__}; ms per call (best of {args.repeats}) by rows M")
  print("| weights | layout | " + " | ".join(f"M={m}" for m in rows) + " | M=2 / M=1 |")
  print("|---|---|" + "---|" * (len(rows) + 1))
  for label, k, n, copies in shapes:
    for name, (shape, fn) in layouts.items():
      ws = [jnp.asarray(rng.standard_normal(shape(k, n), dtype=np.float32)) for _ in range(copies)]
      f = jax.jit(lambda x, ws, fn=fn: [fn(x, w) for w in ws])
      ms = [best_ms(f, jnp.ones((m, k), jnp.float32), ws, repeats=args.repeats) for m in rows]
      ratio = ms[rows.index(2)] / ms[rows.index(1)] if {1, 2} <= set(rows) else float("nan")
      print(f"| {label} | {name} | " + " | ".join(f"{t:.2f}" for t in ms) + f" | {ratio:.2f} |")


if __name__ == "__main__":
  main()

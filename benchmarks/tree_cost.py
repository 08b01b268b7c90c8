"""Cost of the target's verification forward by tree size, and of batched decode steps, on this machine.

  python benchmarks/tree_cost.py [--sizes 1,2,4,8,16,32,48] [--batches 1,8,32]

Real SmolLM2-135M weights, float32. Tree sizes: one cached forward over T tokens at 256 tokens of
context (vsd_jax.decoding.autotune.time_verify). Batches: (time of 34 new tokens - time of 2) / 32 per
decode step of vanilla.generate.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vsd_jax.decoding.vanilla import generate  # noqa: E402
from vsd_jax.decoding.autotune import time_verify  # noqa: E402
from vsd_jax.weights import load_target  # noqa: E402
from vsd_jax.weights.registry import untie_on_this_device  # noqa: E402


def step_ms(target, batch):
  ids, lens = jnp.ones((batch, 64), jnp.int32), jnp.full((batch,), 40, jnp.int32)
  best = {}
  for n in (2, 34):
    f = lambda: generate(target.model, target.params, ids, lens, jax.random.PRNGKey(0), 0.0, max_new_tokens=n,
                         cache_slots=256)
    jax.block_until_ready(f())
    t = []
    for _ in range(2):
      t0 = time.perf_counter(); jax.block_until_ready(f()); t.append(time.perf_counter() - t0)
    best[n] = min(t)
  return (best[34] - best[2]) / 32 * 1000


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="1,2,4,8,16,32,48")
  ap.add_argument("--batches", default="1,8,32")
  a = ap.parse_args()
  target = load_target("smollm2-135m-instruct", with_tokenizer=False, scan_layers=False,
                       untie_lm_head=untie_on_this_device())
  sizes = [int(x) for x in a.sizes.split(",")]
  ms = [time_verify(target, t, 1, 256, 384) * 1000 for t in sizes]
  print("| tokens T | " + " | ".join(map(str, sizes)) + " |")
  print("|---|" + "---|" * len(sizes))
  print("| ms | " + " | ".join(f"{m:.1f}" for m in ms) + " |")
  for b in [int(x) for x in a.batches.split(",") if x]:
    s = step_ms(target, b)
    print(f"batch {b}: {s:.1f} ms/step, {b / s * 1000:.0f} tokens/s")


if __name__ == "__main__":
  main()

"""The training dataset at EAGLE-3's recipe scale: build it from N synthetic conversations and iterate one epoch.

  python benchmarks/dataset_scale.py --n 500000 [--inmemory_n 100000] [--workdir /tmp/dataset_scale] [--keep]

Synthetic conversations: N sequences of 32..2048 tokens (uniform; mean ~1040), token ids uniform in a 151,936-id
vocabulary, the loss mask 1 from a random point (the response) to the end, drawn one at a time from a seeded
generator (the store variant never holds N of them at once; the in-memory one must: from_pairs
takes a list). Each variant runs in its own subprocess, so its peak RSS
(resource.getrusage ru_maxrss) is its own:
  store     the pipeline's path: data.sequence_store.store_sequences over the conversations (one fingerprint pass,
            one writing pass into <workdir>/sequences-<key>), then one epoch of iterate_batches as train.py runs it
            (batch 32, sort_window 256, buckets 64..2048). build_s includes generating the conversations twice
            (store_sequences reads its items twice); generate_pass_s is one pass of the generator alone, timed first.
  store_half  the same store and epoch as process 1 of 2 reads it (process_index=1, process_count=2: half the rows
            of every global batch, padded to the global batch's bucket)
  inmemory  the dataset before the store (vsd_jax/data/dataset.py at git revision --baseline, loaded from git):
            SequenceDataset.from_pairs over a list of the conversations, then the same epoch. --inmemory_n (default
            N) runs it at fewer conversations when N would not fit or take too long; the report says so. Its
            build_s includes one pass of the generator.
Prints one JSON line per variant and a summary; deletes <workdir> afterwards unless --keep.
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

VOCAB = 151_936
BATCH, SORT_WINDOW, MAX_LEN = 32, 256, 2048


class Conversations:
  """Re-iterable: yields (input_ids int32 [T], loss_mask int32 [T]) for n synthetic conversations, the same each
  pass, one at a time."""

  def __init__(self, n: int, seed: int = 0):
    self.n, self.seed = n, seed

  def __iter__(self):
    rng = np.random.default_rng(self.seed)
    for _ in range(self.n):
      t = int(rng.integers(32, MAX_LEN + 1))
      ids = rng.integers(0, VOCAB, t, dtype=np.int32)
      mask = np.zeros(t, np.int32)
      mask[int(rng.integers(1, t)):] = 1
      yield ids, mask


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def epoch(dataset, iterate_batches, **kw) -> dict:
  from vsd_jax.data.dataset import bucket_lengths
  t, batches, tokens = time.time(), 0, 0
  for b in iterate_batches(dataset, BATCH, seed=0, epoch=0, buckets=bucket_lengths(MAX_LEN),
                           sort_window=SORT_WINDOW, **kw):
    batches += 1
    tokens += int(b["attention_mask"].sum())
  return dict(epoch_s=time.time() - t, batches=batches, tokens=tokens)


def run_store(n: int, workdir: str) -> dict:
  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.data.sequence_store import store_sequences
  t = time.time()
  for _ in Conversations(n):  # what one pass of the synthetic generator costs (build_s has two)
    pass
  generate_s = time.time() - t
  t = time.time()
  ds = store_sequences(workdir, Conversations(n), builder="bench")
  out = dict(build_s=time.time() - t, generate_pass_s=generate_s, rss_after_build_gib=peak_rss_gib(), sequences=len(ds),
             store_bytes=sum(os.path.getsize(os.path.join(workdir, d, f)) for d in os.listdir(workdir)
                             for f in os.listdir(os.path.join(workdir, d))))
  out.update(epoch(ds, iterate_batches))
  return out


def run_store_half(workdir: str) -> dict:
  """The store the `store` variant built, as process 1 of 2 reads it: its half of every global batch."""
  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.data.sequence_store import open_store
  (name,) = [d for d in os.listdir(workdir) if d.startswith("sequences-") and ".partial" not in d]
  ds = open_store(os.path.join(workdir, name))
  out = dict(build_s=0.0, sequences=len(ds))
  out.update(epoch(ds, iterate_batches, process_index=1, process_count=2))
  return out


def run_inmemory(n: int, baseline: str) -> dict:
  source = subprocess.run(["git", "-C", ROOT, "show", f"{baseline}:vsd_jax/data/dataset.py"], check=True,
                          capture_output=True, text=True).stdout
  with tempfile.NamedTemporaryFile("w", suffix="_dataset_baseline.py", delete=False) as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("dataset_baseline", f.name)
  old = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = old  # (dataclasses look their module up)
  spec.loader.exec_module(old)
  os.remove(f.name)
  t = time.time()
  ds = old.SequenceDataset.from_pairs(list(Conversations(n)))
  out = dict(build_s=time.time() - t, rss_after_build_gib=peak_rss_gib(), sequences=len(ds))
  out.update(epoch(ds, old.iterate_batches))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=500_000)
  p.add_argument("--inmemory_n", type=int, default=0, help="conversations for the in-memory variant (0: --n)")
  p.add_argument("--workdir", default="/tmp/dataset_scale")
  p.add_argument("--baseline", default="42c81b5", help="git revision whose dataset.py is the in-memory variant")
  p.add_argument("--variants", default="store,store_half,inmemory")
  p.add_argument("--keep", action="store_true")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    t = time.time()
    res = (run_store(a.n, a.workdir) if a.child == "store" else run_store_half(a.workdir) if a.child == "store_half"
           else run_inmemory(a.n, a.baseline))
    res.update(variant=a.child, n=a.n, total_s=time.time() - t, peak_rss_gib=peak_rss_gib())
    print("RESULT " + json.dumps(res), flush=True)
    return
  os.makedirs(a.workdir, exist_ok=True)
  results = {}
  try:
    for v in a.variants.split(","):
      n = a.inmemory_n or a.n if v == "inmemory" else a.n
      proc = subprocess.run([sys.executable, __file__, "--child", v, "--n", str(n), "--workdir", a.workdir,
                             "--baseline", a.baseline], capture_output=True, text=True)
      line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
      if proc.returncode or not line:
        print(f"{v}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
        continue
      results[v] = json.loads(line[0][7:])
      print(json.dumps(results[v]), flush=True)
  finally:
    if not a.keep:
      shutil.rmtree(a.workdir, ignore_errors=True)
  for v, r in results.items():
    scale = a.n / r["n"]
    note = "" if scale == 1 else (f"; at {a.n} conversations (x{scale:g}, extrapolated linearly): about "
                                  f"{r['peak_rss_gib'] * scale:.1f} GiB, {r['total_s'] * scale:.0f} s")
    print(f"{v}: {r['n']} conversations, peak RSS {r['peak_rss_gib']:.2f} GiB, build {r['build_s']:.1f} s, "
          f"epoch {r['epoch_s']:.1f} s ({r['batches']} batches){note}")


if __name__ == "__main__":
  main()

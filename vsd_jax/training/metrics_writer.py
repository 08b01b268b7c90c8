"""Training metrics: one JSON object per logged step in <workdir>/metrics.jsonl, and TensorBoard scalars.

Only process 0 writes. On resume from step s, records after s (logged by the interrupted run after its
last checkpoint) are dropped from both, so the files read like one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

import jax
import numpy as np
# tensorboardX is imported only when TensorBoard logging is on (it takes seconds to import).


def mean_metrics(history) -> dict:
  """Mean over a list of {name: scalar} dicts (host values), name by name."""
  out = {}
  for k in history[0]:
    out[k] = float(np.mean([float(h[k]) for h in history]))
  return out


class MetricsWriter:
  """JSONL + TensorBoard writer. `start_step`: the step training (re)starts from."""

  def __init__(self, workdir: str, start_step: int = 0, tensorboard: bool = True,
               enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(start_step)
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      # purge_step hides events at >= start_step left by an interrupted run.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=start_step + 1 if start_step > 0 else None)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut off by a kill mid-write
        if rec.get("step", 0) <= step:
          keep.append(json.dumps(rec) + "\n")
    with open(self.path, "w") as f:
      f.writelines(keep)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    rec = {"step": int(step)}
    rec.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()})
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"train/{k}", float(v), int(step))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()

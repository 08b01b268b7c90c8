"""evaluate's report: the Markdown table and the picture (acceptance.png) of per-set results (`metrics.summarize`).

Results are keyed "<set>@T=<temperature>"; each holds tau, n_alpha, accept_hist (rounds by accepted drafts m =
0..D), vanilla_tok_per_s, spec_tok_per_s, speedup, identical_outputs and prompts.
"""

from __future__ import annotations

import os

import numpy as np
# matplotlib is imported when the picture is drawn (it is slow to import and only the report needs it).


def write_report(results: dict, out_dir: str) -> str:
  """results.md and acceptance.png in out_dir; -> the Markdown table."""
  md = results_markdown(results)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(md + "\n")
  plot_results(results, os.path.join(out_dir, "acceptance.png"))
  return md


def results_markdown(results: dict) -> str:
  lines = ["| set | T | tau | n-alpha (depth 1..) | vanilla tok/s | spec tok/s | speedup | identical |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    bench, temp = name.split("@T=")
    alpha = " ".join(f"{a:.2f}" for a in r["n_alpha"])
    lines.append(f"| {bench} | {temp} | {r['tau']:.2f} | {alpha} | {r['vanilla_tok_per_s']:.1f} | "
                 f"{r['spec_tok_per_s']:.1f} | {r['speedup']:.2f}x | {r['identical_outputs']}/{r['prompts']} |")
  return "\n".join(lines)


def plot_results(results: dict, path: str):
  """Draw acceptance.png (headless) and return the figure. Top: per set, vanilla and speculative tokens/s as bars,
  the speedup written on the speculative one; beside it, tau (tokens per target forward) per set. Bottom: per set,
  the accepted-length distribution (fraction of rounds that accepted m = 0..D drafts) as bars on an integer axis.
  Sizes grow with the number of sets, so one set and twelve both read."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results)
  n = len(names)
  x = np.arange(n)
  fig = plt.figure(figsize=(max(9.0, 4.0 + 1.1 * n), 8.5))
  grid = fig.add_gridspec(2, 2, width_ratios=(3, 1.4), height_ratios=(1, 1))
  speed, tau_ax, hist_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
  van = [results[k]["vanilla_tok_per_s"] for k in names]
  spec = [results[k]["spec_tok_per_s"] for k in names]
  speed.bar(x - 0.2, van, 0.4, label="vanilla", color="#9e9e9e")
  bars = speed.bar(x + 0.2, spec, 0.4, label="speculative", color="#1f77b4")
  for b, k in zip(bars, names):
    speed.annotate(f"{results[k]['speedup']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                   ha="center", va="bottom", fontsize=9 if n <= 6 else 7, fontweight="bold")
  speed.set_xticks(x, names, rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=8)
  speed.set(ylabel="tokens / s", title="Decoding speed (speedup over vanilla on the bars)")
  speed.set_ylim(0, 1.15 * max(van + spec + [1e-9]))
  speed.legend(fontsize=8, loc="lower right")
  taus = [results[k]["tau"] for k in names]
  tau_bars = tau_ax.barh(x, taus, color="#ff7f0e")
  for b, t in zip(tau_bars, taus):
    tau_ax.annotate(f"{t:.2f}", (b.get_width(), b.get_y() + b.get_height() / 2), va="center", ha="left", fontsize=8)
  tau_ax.set_yticks(x, names, fontsize=8)
  tau_ax.invert_yaxis()
  tau_ax.set(xlabel="tau (tokens per target forward)", title="Tau", xlim=(0, 1.2 * max(taus + [1.0])))
  width = 0.8 / max(n, 1)
  depth = 0
  for i, k in enumerate(names):
    h = np.asarray(results[k]["accept_hist"], float)
    depth = max(depth, len(h) - 1)
    hist_ax.bar(np.arange(len(h)) - 0.4 + width * (i + 0.5), h / max(h.sum(), 1.0), width, label=k)
  hist_ax.set_xticks(range(depth + 1))
  hist_ax.set(xlabel="draft tokens accepted in a round (m)", ylabel="fraction of rounds", ylim=(0, 1),
              title="Accepted length per round")
  hist_ax.legend(fontsize=7 if n > 6 else 8, ncol=min(n, 6))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return fig

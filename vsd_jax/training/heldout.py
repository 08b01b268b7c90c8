"""Held-out report after training: how well the draft predicts the target on prompts never trained on."""

from __future__ import annotations

import copy

from vsd_jax.resolved import as_resolved


def heldout_config(config):
  """A copy of config whose data.sources is the held-out prompt source only (Resolved.heldout.source: config.eval's
  heldout_source, else EAGLE's file at heldout_path): what the data pipeline, which reads config.data, prepares the
  held-out sequences from. No other field changes; `config` itself is not modified."""
  ev = copy.deepcopy(config)
  with ev.unlocked():
    ev.data.sources = dict(heldout=as_resolved(config).heldout.source)
  return ev


def heldout_report(config, target, vocab, params) -> dict:
  """Held-out report on prompts never trained on (their own response cache), the same for every method:
  EAGLE-3's per-step top-1 agreement and simulated tau (teacher forcing), and the draft's own chains as VSD
  sees them: E_q[U] and per-depth acceptance c_k of config.vsd.depth-token paths sampled from the draft
  and verified by the target (config.vsd.accept_mode)."""
  from vsd_jax.data.pipeline import prepare_data

  data = prepare_data(heldout_config(config), target, draft_vocab=False)
  return heldout_metrics(config, target, vocab, params, data.dataset, pixels=data.pixels)


def heldout_metrics(config, target, vocab, params, ds, pixels=None) -> dict:
  """The report's figures for the SequenceDataset `ds`; see heldout_report. The measurement is the method's own
  (`Method.heldout_metrics_fn`, built by `methods.build_method`); config (a ConfigDict or Resolved) is only read.
  pixels: the PixelLoader of a multimodal `ds` (TrainingData.pixels)."""
  import jax
  import numpy as np

  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.methods import build_method

  settings = as_resolved(config)
  bs = min(settings.train.batch_size, len(ds))
  method = build_method(settings, target, vocab)
  metrics_fn = jax.jit(method.heldout_metrics_fn)  # one target pass: EAGLE-3's and the chains' metrics
  steps, depth = settings.draft.ttt_steps, settings.vsd.depth
  sums, weights, chain_sums, anchors = {}, 0.0, {}, 0.0
  for i, batch in enumerate(iterate_batches(ds, bs, seed=0, buckets=settings.data.buckets, drop_last=False,
                                            pixels=pixels)):
    cm = metrics_fn(params, method.frozen, batch, jax.random.PRNGKey(i))
    w = float(cm["num_tokens"])
    for k in [f"acc_{j}" for j in range(steps)]:
      sums[k] = sums.get(k, 0.0) + float(cm[k]) * w
    weights += w
    a = float(cm["anchors"])
    for k, v in cm.items():
      chain_sums[k] = chain_sums.get(k, 0.0) + float(v) * a
    anchors += a
  mean = {k: v / max(weights, 1.0) for k, v in sums.items()}
  chain = {k: v / max(anchors, 1.0) for k, v in chain_sums.items()}
  acc = [mean[f"acc_{k}"] for k in range(steps)]
  source = settings.heldout.source
  return dict(heldout=str(source.get("path", settings.heldout.path)), sequences=len(ds),
              response_tokens=int(ds.num_loss_tokens()), step_acc=acc, tau_simulated=float(1 + np.sum(np.cumprod(acc))),
              chain=dict(accept_mode=settings.vsd.accept_mode, depth=depth, anchors=int(anchors),
                         tau_chain=1.0 + chain.get("mean_u", 0.0),
                         c_k=[chain.get(f"c_{k + 1}", 0.0) for k in range(depth)]))

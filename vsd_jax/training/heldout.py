"""Held-out report after training: how well the draft predicts the target on prompts never trained on."""

from __future__ import annotations

import copy


def heldout_config(config):
  """config with data.sources = the held-out prompts (config.eval) only. Its VSD loss carries EAGLE-3's term
  (mu = 1, so one target pass gives both metric sets) and no CAR; only metrics are read from it. The chains
  are always the sampled ones (estep "mcmc"; the metrics do not depend on the E-step's weights), so a run
  trained with estep "exact" is measured like every other."""
  ev = copy.deepcopy(config)
  # config.eval.heldout_source: a whole source spec (e.g. LLaVA-Instruct prompts with images), else EAGLE's file.
  source = config.eval.get("heldout_source", None)
  source = dict(source) if source else dict(type="eagle", path=config.eval.heldout_path,
                                            limit=int(config.eval.heldout_limit))
  with ev.unlocked():
    ev.data.sources = dict(heldout=source)
    ev.vsd.lambda_car, ev.vsd.mu, ev.vsd.estep = 0.0, 1.0, "mcmc"
  return ev


def heldout_report(config, target, vocab, params) -> dict:
  """Held-out report on prompts never trained on (their own response cache), the same for every method:
  EAGLE-3's per-step top-1 agreement and simulated tau (teacher forcing), and the draft's own chains as VSD
  sees them: E_q[U] and per-depth acceptance c_k of config.vsd.depth-token paths sampled from the draft
  and verified by the target (config.vsd.accept_mode)."""
  from vsd_jax.data.pipeline import prepare_data

  ev = heldout_config(config)
  data = prepare_data(ev, target, draft_vocab=False)
  return heldout_metrics(ev, target, vocab, params, data.dataset, pixels=data.pixels)


def heldout_metrics(ev, target, vocab, params, ds, pixels=None) -> dict:
  """The report's figures for the SequenceDataset `ds` under `ev` (a heldout_config); see heldout_report.
  pixels: the PixelLoader of a multimodal `ds` (TrainingData.pixels)."""
  import jax
  import numpy as np

  from vsd_jax.data.dataset import iterate_batches
  from vsd_jax.methods import eagle3
  from vsd_jax.methods.vsd import initial_method_state
  from vsd_jax.methods.vsd.loss import make_vsd_loss

  bs = min(int(ev.train.batch_size), len(ds))
  base = eagle3.build(ev, target, vocab)
  draft, frozen = base.draft, base.frozen
  metrics_fn = jax.jit(make_vsd_loss(ev, target, draft))  # one target pass: EAGLE-3's and the chains' metrics
  state = initial_method_state(int(ev.vsd.depth))
  sums, weights, chain_sums, anchors = {}, 0.0, {}, 0.0
  for i, batch in enumerate(iterate_batches(ds, bs, seed=0, buckets=tuple(ev.data.buckets), drop_last=False,
                                            pixels=pixels)):
    _, (cm, _) = metrics_fn(params, frozen, batch, jax.random.PRNGKey(i), state)
    w = float(cm["num_tokens"])
    for k in [f"acc_{j}" for j in range(int(ev.draft.ttt_steps))]:
      sums[k] = sums.get(k, 0.0) + float(cm[k]) * w
    weights += w
    a = float(cm["anchors"])
    for k, v in cm.items():
      chain_sums[k] = chain_sums.get(k, 0.0) + float(v) * a
    anchors += a
  mean = {k: v / max(weights, 1.0) for k, v in sums.items()}
  chain = {k: v / max(anchors, 1.0) for k, v in chain_sums.items()}
  steps = int(ev.draft.ttt_steps)
  acc = [mean[f"acc_{k}"] for k in range(steps)]
  depth = int(ev.vsd.depth)
  return dict(heldout=str(ev.data.sources.heldout.get("path", ev.eval.heldout_path)), sequences=len(ds), response_tokens=int(ds.num_loss_tokens()),
              step_acc=acc, tau_simulated=float(1 + np.sum(np.cumprod(acc))),
              chain=dict(accept_mode=str(ev.vsd.accept_mode), depth=depth, anchors=int(anchors),
                         tau_chain=1.0 + chain.get("mean_u", 0.0),
                         c_k=[chain.get(f"c_{k + 1}", 0.0) for k in range(depth)]))

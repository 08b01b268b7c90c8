"""VSD as a training method: one online EM iteration per batch (shared/docs/VSD_METHOD.md).

    paths.py    the draft's own paths from M anchors per sequence (the decode-time chain unroll)
    oracle.py   the target's p_k along every path, in one tree forward, reduced to what acceptance and CAR read
    utility.py  acceptance a_k, path utility U, realised length, per-depth acceptance c_k
    estep.py    independence Metropolis-Hastings / SNIS weights from the oracle-filtered posterior
    mstep.py    Adaptive Rejection Weighting, Confidence-Aware Regularization, rejection strength
    loss.py     the loss the trainer differentiates, in named pieces: batch_pass, sample_chains (ChainSample),
                e_step (EStepOut), m_step_loss (MStepLoss: ARW + CAR + mu * EAGLE-3's TTT loss), monitors
                (Monitors); the held-out report's measurement (make_heldout_metrics)

Per batch: the target runs once over the sequences (features, logits, KV cache); M anchors per sequence;
E-step: S draft paths of depth K per anchor from q_old (stop_gradient), the oracle's p_k for all of them,
acceptance, utility, MCMC or SNIS weights over the proposals; M-step: ARW on the weighted sample + CAR on
the visited positions + EAGLE-3's TTT loss. The per-depth acceptance EMA c_k (ARW's eta_k) is the method
state carried between steps.
"""

from __future__ import annotations

from vsd_jax.methods.base import Method
from vsd_jax.methods.vsd.loss import initial_method_state, make_heldout_metrics, make_vsd_loss
from vsd_jax.resolved import as_resolved

__all__ = ["build", "initial_method_state", "make_heldout_metrics", "make_vsd_loss"]


def build(config, target, vocab) -> Method:
  """Method for config.method == "vsd": EAGLE-3's draft, params init and frozen inputs, VSD's loss.
  config: a ConfigDict (resolved here) or a `vsd_jax.resolved.Resolved`."""
  from vsd_jax.methods import eagle3

  settings = as_resolved(config)
  base = eagle3.build(settings, target, vocab)
  return Method(base.draft, base.init_params, make_vsd_loss(settings, target, base.draft), base.frozen,
                initial_method_state(settings.vsd.depth))

"""VSD as a training method: one online EM iteration per batch (shared/docs/VSD_METHOD.md).

    paths.py    the draft's own paths from M anchors per sequence (the decode-time chain unroll)
    oracle.py   the target's p_k along every path, in one tree forward
    utility.py  acceptance a_k, path utility U, realised length, per-depth acceptance c_k
    estep.py    independence Metropolis-Hastings / SNIS weights from the oracle-filtered posterior
    mstep.py    Adaptive Rejection Weighting, Confidence-Aware Regularization, rejection strength
    loss.py     the loss the trainer differentiates: E-step, then ARW + CAR + mu * EAGLE-3's TTT loss

Per batch: the target runs once over the sequences (features, logits, KV cache); M anchors per sequence;
E-step: S draft paths of depth K per anchor from q_old (stop_gradient), the oracle's p_k for all of them,
acceptance, utility, MCMC or SNIS weights over the proposals; M-step: ARW on the weighted sample + CAR on
the visited positions + EAGLE-3's TTT loss. The per-depth acceptance EMA c_k (ARW's eta_k) is the method
state carried between steps.
"""

from __future__ import annotations

from vsd_jax.methods.base import Method
from vsd_jax.methods.vsd import estep, utility


def check_config(v) -> None:
  """Raise ValueError naming the config.vsd field that is out of range."""
  def bad(field, why):
    raise ValueError(f"config.vsd.{field}={v[field]!r}: {why}")
  for field in ("depth", "num_paths", "num_anchors"):
    if int(v[field]) < 1:
      bad(field, "must be >= 1")
  if not 0 <= int(v.burn_in) < int(v.num_paths):
    bad("burn_in", f"must be in [0, num_paths={v.num_paths})")
  if float(v.draft_temperature) <= 0:
    bad("draft_temperature", "must be > 0 (the E-step samples proposals from q)")
  if v.accept_mode not in utility.ACCEPT_MODES:
    bad("accept_mode", f"use one of {utility.ACCEPT_MODES}")
  if v.accept_mode == "stochastic" and float(v.accept_temperature) <= 0:
    bad("accept_temperature", "must be > 0 with accept_mode='stochastic'")
  if v.utility not in utility.UTILITIES:
    bad("utility", f"use one of {utility.UTILITIES}")
  if v.estep not in estep.ESTEPS:
    bad("estep", f"use one of {estep.ESTEPS}")
  if not 0 <= float(v.ema_decay) < 1:
    bad("ema_decay", "must be in [0, 1)")
  for field in ("eta", "eta_max", "rho0", "rho", "gamma", "lambda_car", "car_beta", "mu"):
    if float(v[field]) < 0:
      bad(field, "must be >= 0")


def initial_method_state(depth: int) -> dict:
  """The per-depth acceptance EMA (mstep.update_acceptance_ema) before the first step: float32 [K] each."""
  import jax.numpy as jnp
  return {"ema": jnp.zeros((depth,), jnp.float32), "weight": jnp.zeros((depth,), jnp.float32)}


def build(config, target, vocab) -> Method:
  """Method for config.method == "vsd": EAGLE-3's draft, params init and frozen inputs, VSD's loss."""
  from vsd_jax.methods import eagle3
  from vsd_jax.methods.vsd.loss import make_vsd_loss

  base = eagle3.build(config, target, vocab)
  return Method(base.draft, base.init_params, make_vsd_loss(config, target, base.draft), base.frozen,
                initial_method_state(int(config.vsd.depth)))

"""EAGLE-3 as a training method for the generic trainer: draft module, params init, loss, frozen inputs."""

from __future__ import annotations


def _scalar_metrics(metrics: dict) -> dict:
  """Loss metrics -> the flat scalars the trainer logs (per-step arrays become step{k} entries)."""
  out = {"tau": metrics["tau"], "num_tokens": metrics["num_tokens"]}
  for k in range(metrics["step_acc"].shape[0]):
    out[f"acc_{k}"] = metrics["step_acc"][k]
    out[f"loss_{k}"] = metrics["step_loss"][k]
  return out


def build_eagle3(config, target, vocab):
  """-> (draft module, init_params(rng) boxed, loss_fn(params, frozen, batch, rng), frozen)."""
  import jax.numpy as jnp

  from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
  from vsd_jax.training.eagle3_loss import SoftLabels, eagle3_loss, target_features, validate_vocab_maps

  dcfg = Eagle3Config.from_target(target.config, draft_vocab_size=int(vocab.d2t.shape[0]))
  draft = Eagle3Draft(dcfg)
  validate_vocab_maps(vocab.t2d, vocab.d2t, target.config.vocab_size)
  frozen = dict(target=target.params, t2d=jnp.asarray(vocab.t2d), d2t=jnp.asarray(vocab.d2t))

  def init_params(rng):
    embed = target.params["embed_tokens"]["embedding"]
    feats = jnp.zeros((1, 2, 3 * dcfg.hidden_size), dcfg.jnp_dtype)
    return draft.init(rng, embed, jnp.zeros((1, 2), jnp.int32), feats)["params"]

  def loss_fn(params, frozen, batch, rng):
    del rng
    valid = batch["attention_mask"].astype(bool)
    if "features" in batch:  # train.target_features="precomputed" (vsd_jax/training/feature_cache.py)
      feats = batch["features"]
      logits = SoftLabels(batch["label_logits"], batch["target_top"], batch["top_in_draft"].astype(bool))
    else:
      feats, logits = target_features(target.model, frozen["target"], batch["input_ids"], valid)
    loss, m = eagle3_loss(params, draft, frozen["target"]["embed_tokens"]["embedding"], feats, batch["input_ids"],
                          logits, batch["loss_mask"], frozen["t2d"], frozen["d2t"],
                          num_steps=int(config.draft.ttt_steps), decay=float(config.draft.step_decay),
                          attention_mask=valid)
    return loss, _scalar_metrics(m)

  return draft, init_params, loss_fn, frozen

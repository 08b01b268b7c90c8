"""EAGLE-3 as a training method: the draft head trained with the training-time-test loss (`loss.py`).

Multimodal (LLaVA) targets: a batch's images (batch["pixel_values"] [B, I, C, S, S]) go into the target's pass,
so the draft reads the features of the multimodal prefill at text and image positions; image positions are
never predicted (`drop_image_tokens`: loss_mask 0 at image tokens, as the EAGLE-3 / ViSpec baselines train).
config.draft.vision_adaptor adds ViSpec's vision adaptor to the draft (models/eagle3.py `VisionAdaptor`): the TTT
unroll's step 0 pools the sequence's image positions, every step fuses the result into its text rows.
"""

from __future__ import annotations

from vsd_jax.methods.base import Method
from vsd_jax.resolved import DraftSettings, Resolved, as_resolved


def scalar_metrics(metrics: dict) -> dict:
  """`loss.eagle3_loss` metrics -> the flat scalars the trainer logs (per-step arrays become acc_k / loss_k)."""
  out = {"tau": metrics["tau"], "num_tokens": metrics["num_tokens"]}
  for k in range(metrics["step_acc"].shape[0]):
    out[f"acc_{k}"] = metrics["step_acc"][k]
    out[f"loss_{k}"] = metrics["step_loss"][k]
    out[f"alpha_{k}"] = metrics["step_alpha"][k]
  return out


def drop_image_tokens(loss_mask, input_ids, target_config):
  """loss_mask with 0 at the image tokens of a multimodal target (LlavaConfig.image_token_id); unchanged for text
  targets. Image tokens sit in the prompt, which the mask already leaves out; this makes it hold by construction
  for any data (e.g. a response cut inside an image run, or hand-made batches)."""
  import jax.numpy as jnp
  image_token = getattr(target_config, "image_token_id", None)  # LlamaConfig has none
  if image_token is None:
    return loss_mask
  return jnp.where(input_ids == image_token, jnp.zeros_like(loss_mask), loss_mask)


def batch_loss(d: DraftSettings, target, draft, params, frozen, batch, with_rows: bool = False):
  """`loss.eagle3_loss` on a trainer batch: the target's features and soft labels computed in the step (with the
  batch's images, if any) or read from the precomputed feature cache, image tokens never predicted; the TTT
  settings from `d` (Resolved.draft). Traced inside the jitted step: batch["input_ids"] int32 [B, T],
  attention_mask / loss_mask [B, T] (precomputed: features [B, T, 3H] and the soft labels' [B, T, ...] arrays).
  Returns (loss, metrics) as eagle3_loss (metrics["rows"] with with_rows). Also VSD's exact objective's pass."""
  from vsd_jax.methods.eagle3.loss import SoftLabels, eagle3_loss
  from vsd_jax.models.features import embedding_matrix, image_inputs, target_features

  valid = batch["attention_mask"].astype(bool)
  if "features" in batch:  # train.target_features="precomputed" (vsd_jax/training/feature_cache.py)
    feats = batch["features"]
    labels = SoftLabels(batch["label_logits"], batch["target_top"], batch["top_in_draft"].astype(bool),
                        batch["draft_mass"])
  else:
    feats, labels = target_features(target.model, frozen["target"], batch["input_ids"], valid, **image_inputs(batch))
  loss_mask = drop_image_tokens(batch["loss_mask"], batch["input_ids"], target.config)
  return eagle3_loss(params, draft, embedding_matrix(frozen["target"]), feats, batch["input_ids"], labels,
                     loss_mask, frozen["t2d"], frozen["d2t"], attention_mask=valid, with_rows=with_rows,
                     **d.ttt_loss_options())


def draft_options(settings: Resolved, target) -> dict:
  """Eagle3Config fields set by config.draft: the vision adaptor (draft.vision_adaptor, draft.vision_queries).
  The adaptor reads image positions, so a text-only target with it on is an error naming the switch."""
  d = settings.draft
  if d.vision_adaptor and getattr(target.config, "image_token_id", None) is None:
    raise ValueError(f"config.draft.vision_adaptor=True needs a multimodal (LLaVA) target, but the target "
                     f"{settings.model.name!r} is a text model (no image token, so nothing for the adaptor to read); "
                     "set --config.draft.vision_adaptor=False or use a LLaVA target (configs/llava.py)")
  return dict(vision_adaptor=d.vision_adaptor, vision_queries=d.vision_queries)


def build(config, target, vocab) -> Method:
  """Method for config.method == "eagle3": draft module, init_params(rng) (boxed), loss_fn(params, frozen,
  batch, rng), frozen = {target params, t2d, d2t}. Also the draft and frozen inputs VSD builds on.
  config: a ConfigDict (resolved here) or a `vsd_jax.resolved.Resolved`."""
  import jax.numpy as jnp

  from vsd_jax.methods.eagle3.loss import validate_vocab_maps
  from vsd_jax.models.eagle3 import Eagle3Config, Eagle3Draft
  from vsd_jax.models.features import embedding_matrix

  settings = as_resolved(config)
  dcfg = Eagle3Config.from_target(target.config, draft_vocab_size=int(vocab.d2t.shape[0]),
                                  **draft_options(settings, target))
  draft = Eagle3Draft(dcfg)
  validate_vocab_maps(vocab.t2d, vocab.d2t, target.config.vocab_size)
  frozen = dict(target=target.params, t2d=jnp.asarray(vocab.t2d), d2t=jnp.asarray(vocab.d2t))

  def init_params(rng):
    embed = embedding_matrix(target.params)
    feats = jnp.zeros((1, 2, 3 * dcfg.hidden_size), dcfg.jnp_dtype)
    return draft.init(rng, embed, jnp.zeros((1, 2), jnp.int32), feats)["params"]

  def loss_fn(params, frozen, batch, rng):
    del rng
    loss, m = batch_loss(settings.draft, target, draft, params, frozen, batch)
    return loss, scalar_metrics(m)

  return Method(draft, init_params, loss_fn, frozen)

"""Pure-functional Flax LLaVA-1.5: CLIP vision tower -> two-layer GELU projector -> the project's LLaMA.

    pixel_values [N, C, S, S] --ClipVisionTower--> hidden state `vision_feature_layer` (-2) [N, 1 + P, Hv]
        --drop the class token ("default" strategy)--> [N, P, Hv]
        --multi_modal_projector: linear_1, GELU, linear_2--> image features [N, P, H]
    input_ids [B, T] --LlamaForCausalLM.embed--> [B, T, H]; the k-th image token of the batch (row-major order:
        row 0's image tokens left to right, then row 1's, ...) gets image feature row k of the N*P rows
        (image 0's patches first): HF's `masked_scatter`. Each `<image>` in a prompt is expanded by the
        processor to P image tokens (vsd_jax.data.images), so image i fills the i-th run of P image tokens.
    -> LlamaForCausalLM(inputs_embeds=...) : the same call (positions, masks, KV cache, hidden_layers) as text.

Per-row images (training batches, batched decoding): pixel_values [B, I, C, S, S] (image_features [B, I, P, H])
hold row b's images at [b, :n_b] and blank padding after them, I static; row b's k-th image token gets row b's
feature row k (`place_image_features_per_row`), so rows with different image counts share one static shape and
a batch sharded over its rows keeps each row's images on its device.

Image tokens and features must be equally many; that is checked where the inputs are made
(vsd_jax.data.images.prepare_prompt), since under jit a count is not a Python value. Feature rows past the
last image token are unused, so a batch may pad its images with blank ones up to a static count.

After a prefill with images, decoding is text only: the same model called with new token ids and the KV cache
and no pixel_values is exactly the language model (no image token among new tokens), so every decoding and
feature-capture path written for a LLaMA target runs unchanged. `LlavaConfig` forwards the language model's
fields (num_layers, vocab_size, eagle3_layers, ...) for the same reason.

Shapes: B batch, T tokens, N images, P patches per image, Hv vision hidden, H text hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsd_jax.models.clip import ClipVisionConfig, ClipVisionTower, activation, resolve_feature_layers
from vsd_jax.models.kv_cache import KVCache
from vsd_jax.models.llama import LlamaConfig, LlamaForCausalLM, LlamaOutput


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA = vision tower config + language model config + how they meet. Frozen: a static jit argument.

  Fields that are not LLaVA's own are read from the language model's LlamaConfig (`cfg.num_layers`,
  `cfg.vocab_size`, `cfg.eagle3_layers`, `cfg.jnp_dtype`, ...), so code written for a LLaMA target (KV cache
  shapes, the EAGLE-3 feature layers, the vocabulary) reads a LLaVA target's config unchanged.
  """
  text: LlamaConfig = LlamaConfig()
  vision: ClipVisionConfig = ClipVisionConfig()
  image_token_id: int = 32000
  vision_feature_layer: object = -2            # int, or a tuple of ints (features concatenated)
  vision_feature_select_strategy: str = "default"  # "default": drop the class token; "full": keep it
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True

  def __post_init__(self):
    if not isinstance(self.vision_feature_layer, int):  # a tuple, so that the config stays hashable
      object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: use 'default' "
                       "(drop the class token) or 'full'")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id={self.image_token_id} is outside the language model's vocabulary "
                       f"(vocab_size={self.text.vocab_size})")
    resolve_feature_layers(self.vision, self.vision_feature_layer)
    activation(self.projector_hidden_act)

  def __getattr__(self, name):
    # Only called for names that are not LlavaConfig's own: the language model's fields.
    if name.startswith("__") or name in ("text", "vision"):
      raise AttributeError(name)
    return getattr(self.text, name)

  @property
  def feature_layers(self) -> tuple:
    """The vision tower's hidden states LLaVA reads, as non-negative indices (-2 of 24 layers -> (23,))."""
    return resolve_feature_layers(self.vision, self.vision_feature_layer)

  @property
  def num_image_tokens(self) -> int:
    """Image tokens (feature rows) per image: the patches, plus the class token with the "full" strategy."""
    return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

  def replace(self, **kw) -> "LlavaConfig":
    """Replace LLaVA fields (text=, vision=, image_token_id=, ...); any other field is the language model's."""
    own = {f.name for f in dataclasses.fields(self)}
    text_kw = {k: kw.pop(k) for k in list(kw) if k not in own}
    out = dataclasses.replace(self, **kw)
    return dataclasses.replace(out, text=out.text.replace(**text_kw)) if text_kw else out


def place_image_features(embeds: jax.Array, image_features: jax.Array, is_image: jax.Array) -> jax.Array:
  """embeds [B, T, H] with its k-th image position (row-major over the batch) replaced by feature row k.

  image_features: [N, P, H] (its N*P rows in order); is_image: bool [B, T]. Positions past the N*P-th image
  token would repeat the last row: callers ensure the counts match (data.images.prepare_prompt).
  """
  b, t, h = embeds.shape
  rows = image_features.reshape(-1, image_features.shape[-1]).astype(embeds.dtype)
  flat = is_image.reshape(-1)
  k = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, rows.shape[0] - 1)
  return jnp.where(flat[:, None], rows[k], embeds.reshape(b * t, h)).reshape(b, t, h)


def place_image_features_per_row(embeds: jax.Array, image_features: jax.Array, is_image: jax.Array) -> jax.Array:
  """embeds [B, T, H] with row b's k-th image position replaced by row k of image_features[b] ([B, I, P, H]: its
  I*P rows in order; rows past the row's image tokens, e.g. blank padding images, are unused)."""
  b = embeds.shape[0]
  rows = image_features.reshape(b, 1, -1, image_features.shape[-1])
  return jax.vmap(place_image_features)(embeds[:, None], rows, is_image[:, None])[:, 0]


class LlavaProjector(nn.Module):
  """multi_modal_projector: [.., Hv * len(feature_layers)] -> linear_1 -> GELU -> linear_2 -> [.., H]."""
  cfg: LlavaConfig

  @nn.compact
  def __call__(self, x):
    cfg, t = self.cfg, self.cfg.text

    def dense(name, axes):
      return nn.Dense(t.hidden_size, use_bias=cfg.projector_bias, name=name, dtype=t.jnp_dtype,
                      param_dtype=t.jnp_param_dtype,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
    h = activation(cfg.projector_hidden_act)(dense("linear_1", ("embed", "mlp"))(x))
    return dense("linear_2", ("mlp", "embed"))(h)


class LlavaForConditionalGeneration(nn.Module):
  """LLaVA; params {"vision_tower", "multi_modal_projector", "language_model"} (the last a LlamaForCausalLM's)."""
  cfg: LlavaConfig

  def setup(self):
    self.vision_tower = ClipVisionTower(self.cfg.vision, self.cfg.feature_layers)
    self.multi_modal_projector = LlavaProjector(self.cfg)
    self.language_model = LlamaForCausalLM(self.cfg.text)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values float [N, C, S, S] (the processor's output) -> image features [N, num_image_tokens, H];
    per-row images [B, I, C, S, S] -> [B, I, num_image_tokens, H]."""
    if pixel_values.ndim == 5:
      b, i = pixel_values.shape[:2]
      out = self.image_features(pixel_values.reshape((b * i,) + pixel_values.shape[2:]))
      return out.reshape((b, i) + out.shape[1:])
    h = self.vision_tower(pixel_values)
    if self.cfg.vision_feature_select_strategy == "default":
      h = h[:, 1:]
    return self.multi_modal_projector(h.astype(self.cfg.text.jnp_dtype))

  def __call__(self, input_ids, positions=None, attention_mask=None, kv_cache: Optional[KVCache] = None,
               write_index=None, hidden_layers: Sequence[int] = (), return_logits: bool = True,
               pixel_values=None, image_features=None, logits_at=None) -> LlamaOutput:
    """LlamaForCausalLM's call (same arguments and LlamaOutput; see there) plus the images of the batch.

    input_ids: int32 [B, T], each image expanded to cfg.num_image_tokens tokens cfg.image_token_id.
    pixel_values: float [N, C, S, S], the batch's images in the order of their image tokens, or per row
      [B, I, C, S, S] (row b's images first, blank padding after); or
    image_features: [N, num_image_tokens, H] / [B, I, num_image_tokens, H] already computed (`image_features`).
      Neither: a text-only call (prefill without images, or a decoding step after a prefill with images).
    """
    if pixel_values is not None and image_features is not None:
      raise ValueError("pass pixel_values or image_features, not both")
    if pixel_values is not None and 0 in pixel_values.shape[:pixel_values.ndim - 3]:  # a batch without images
      pixel_values = None
    if pixel_values is not None:
      image_features = self.image_features(pixel_values)
    elif self.is_initializing():  # so that init(rng, input_ids) creates the vision parameters too
      v = self.cfg.vision
      self.image_features(jnp.zeros((1, v.num_channels, v.image_size, v.image_size), v.jnp_dtype))
    kw = dict(positions=positions, attention_mask=attention_mask, kv_cache=kv_cache, write_index=write_index,
              hidden_layers=hidden_layers, return_logits=return_logits, logits_at=logits_at)
    if image_features is None:
      return self.language_model(input_ids, **kw)
    place = place_image_features_per_row if image_features.ndim == 4 else place_image_features
    embeds = place(self.language_model.embed(input_ids), image_features, input_ids == self.cfg.image_token_id)
    return self.language_model(None, inputs_embeds=embeds, **kw)


def target_module(cfg):
  """The target module for a config: LlamaForCausalLM for a LlamaConfig, LlavaForConditionalGeneration for a
  LlavaConfig."""
  return LlamaForCausalLM(cfg) if isinstance(cfg, LlamaConfig) else LlavaForConditionalGeneration(cfg)

"""Pure-functional Flax CLIP vision tower (ViT), as LLaVA uses it: the patch features of chosen encoder layers.

LLaVA-1.5 uses CLIP ViT-L/14 at 336 px: a 14x14 patch embedding (a stride-14 convolution without bias, written
here as one einsum over the cut-out patches), a learned class embedding prepended, learned absolute position
embeddings, a "pre_layrnorm" (HF's spelling), then pre-norm encoder layers (LayerNorm -> multi-head
self-attention with biases -> residual; LayerNorm -> fc1 -> quick_gelu -> fc2 -> residual).

Attention is the project's one kernel, `llama.dot_product_attention`, with a full (bidirectional) mask
(`masks.full_mask`) and no RoPE (the kernel never applies RoPE; LLaMA's `Attention` module rotates q/k before
calling it): CLIP's scale head_dim**-0.5 is the kernel's 1/sqrt(D), and q, k, v all have the Q heads (KV = Q).

Only the layers whose outputs are asked for are built and run: `ClipVisionTower(cfg, feature_layers)` holds
max(feature_layers) layers. LLaVA reads hidden state -2 (the input of the last layer), so its tower has 23 of
ViT-L's 24 layers; the last layer and post_layernorm (used only for CLIP's pooled output) are neither loaded nor
computed, as vLLM also does.

Shapes: N images, C channels, P = (image_size / patch_size)**2 patches, Hv hidden, Q heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsd_jax.models.llama import ArchConfig, dot_product_attention
from vsd_jax.models.masks import full_mask


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(ArchConfig):
  """A CLIP vision tower; the defaults are LLaVA-1.5's ViT-L/14 at 336 px. Frozen: a static jit argument."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24            # the checkpoint's depth; a tower builds only the layers it reads
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


# HF's ACT2FN names of the activations CLIP checkpoints use.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; use one of {', '.join(sorted(ACTIVATIONS))}")
  return ACTIVATIONS[name]


def resolve_feature_layers(cfg: ClipVisionConfig, layers) -> tuple:
  """HF hidden-state indices (0 = embeddings after pre_layrnorm, i = output of layer i; negative from the end,
  -1 = output of the last layer) -> non-negative indices. layers: an int or a sequence of ints."""
  layers = (layers,) if isinstance(layers, int) else tuple(layers)
  n = cfg.num_layers
  out = tuple(i + n + 1 if i < 0 else i for i in layers)
  if not out or any(not 0 <= i <= n for i in out):
    raise ValueError(f"vision feature layers {layers} are out of range for a {n}-layer vision tower "
                     f"(hidden states 0..{n}, or -{n + 1}..-1)")
  return out


def _dense(features, name, axes, cfg: ClipVisionConfig):
  return nn.Dense(
      features, use_bias=True, name=name, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _layer_norm(cfg: ClipVisionConfig, name):
  # Two-pass variance, as torch's LayerNorm: CLIP's residual stream has large outlier channels.
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


class ClipVisionEmbeddings(nn.Module):
  """pixel_values float [N, C, H, W] (H = W = image_size) -> [N, 1 + P, Hv]: class token, then the patches in
  row-major order, plus the position embeddings."""
  cfg: ClipVisionConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.cfg
    n, c, h, w = pixel_values.shape
    if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
      raise ValueError(f"pixel_values of shape {pixel_values.shape}: the vision tower takes [N, {cfg.num_channels}, "
                       f"{cfg.image_size}, {cfg.image_size}] (prepare images with the model's own processor, "
                       "vsd_jax.data.images)")
    p, g = cfg.patch_size, cfg.grid
    pdt = cfg.jnp_param_dtype
    init = nn.initializers.normal(0.02)
    cls = self.param("class_embedding", nn.with_logical_partitioning(init, ("embed",)), (cfg.hidden_size,), pdt)
    # HF's Conv2d weight [Hv, C, kh, kw] with all axes reversed (the loader's transpose): [kw, kh, C, Hv].
    kernel = self.param("patch_embedding", nn.with_logical_partitioning(init, (None, None, None, "embed")),
                        (p, p, c, cfg.hidden_size), pdt)
    pos = self.param("position_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                     (cfg.num_patches + 1, cfg.hidden_size), pdt)
    x = pixel_values.astype(cfg.jnp_dtype).reshape(n, c, g, p, g, p)            # [N, C, gy, kh, gx, kw]
    patches = jnp.einsum("ncyhxw,whco->nyxo", x, kernel.astype(cfg.jnp_dtype)).reshape(n, g * g, cfg.hidden_size)
    cls = jnp.broadcast_to(cls.astype(cfg.jnp_dtype), (n, 1, cfg.hidden_size))
    return jnp.concatenate([cls, patches], axis=1) + pos.astype(cfg.jnp_dtype)[None]


class ClipAttention(nn.Module):
  """Bidirectional multi-head self-attention with biases. x: [N, T, Hv] -> [N, T, Hv]."""
  cfg: ClipVisionConfig

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.cfg
    n, t, _ = x.shape
    q = _dense(cfg.hidden_size, "q_proj", ("embed", "heads"), cfg)(x).reshape(n, t, cfg.num_heads, cfg.head_dim)
    k = _dense(cfg.hidden_size, "k_proj", ("embed", "heads"), cfg)(x).reshape(n, t, cfg.num_heads, cfg.head_dim)
    v = _dense(cfg.hidden_size, "v_proj", ("embed", "heads"), cfg)(x).reshape(n, t, cfg.num_heads, cfg.head_dim)
    out = dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    return _dense(cfg.hidden_size, "out_proj", ("heads", "embed"), cfg)(out.reshape(n, t, cfg.hidden_size))


class ClipMLP(nn.Module):
  cfg: ClipVisionConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = activation(cfg.hidden_act)(_dense(cfg.intermediate_size, "fc1", ("embed", "mlp"), cfg)(x))
    return _dense(cfg.hidden_size, "fc2", ("mlp", "embed"), cfg)(h)


class ClipEncoderLayer(nn.Module):
  """Pre-norm ViT block. Scanned over layers: carry x, out its input when collecting hidden states."""
  cfg: ClipVisionConfig
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, x, mask):
    y = x + ClipAttention(self.cfg, name="self_attn")(_layer_norm(self.cfg, "layer_norm1")(x), mask)
    y = y + ClipMLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "layer_norm2")(y))
    return y, (x if self.collect_hidden else None)


class ClipVisionTower(nn.Module):
  """The hidden states `feature_layers` (non-negative HF indices, `resolve_feature_layers`) of a CLIP ViT.

  Holds and runs max(feature_layers) encoder layers. __call__(pixel_values float [N, C, S, S]) ->
  [N, 1 + P, Hv * len(feature_layers)]: the requested hidden states (class token first) concatenated along
  the last axis in the given order, as HF LLaVA concatenates several feature layers.
  """
  cfg: ClipVisionConfig
  feature_layers: tuple = (23,)

  @property
  def depth(self) -> int:
    return max(self.feature_layers)

  @nn.compact
  def __call__(self, pixel_values):
    cfg = self.cfg
    x = ClipVisionEmbeddings(cfg, name="embeddings")(pixel_values)
    x = _layer_norm(cfg, "pre_layrnorm")(x)
    n, t, _ = x.shape
    mask = full_mask(n, t)
    # Hidden states other than the last one run are needed only when several layers are read.
    collect = tuple(self.feature_layers) != (self.depth,)
    if self.depth == 0:
      layer_inputs = []
    elif cfg.scan_layers:
      Layers = nn.scan(ClipEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast,), length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, layer_inputs = Layers(cfg, collect, name="layers")(x, mask)
    else:
      layer_inputs = []
      for i in range(self.depth):
        x, x_in = ClipEncoderLayer(cfg, collect, name=f"layers_{i}")(x, mask)
        layer_inputs.append(x_in)
    hidden = lambda i: x if i == self.depth else layer_inputs[i]  # noqa: E731
    return jnp.concatenate([hidden(i) for i in self.feature_layers], axis=-1)

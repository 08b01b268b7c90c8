"""Training methods, one package each, found by name (config.method).

Every method package `vsd_jax.methods.<name>` exposes `build(config, target, vocab) -> Method`
(`vsd_jax.methods.base.Method`): the draft module, its params init, the loss the generic trainer
(`vsd_jax.training.trainer`) differentiates, the frozen inputs and the state carried between steps.

    eagle3/  EAGLE-3's training-time-test (TTT) loss                  (loss.py)
    vsd/     Variational Speculative Decoding: draft paths, oracle, utility, E-step, M-step, loss

`build_method` adds what is common to all: config.draft.init_head and config.draft.init_from.
"""

from __future__ import annotations

import importlib
from typing import Callable

from vsd_jax.methods.base import Method
from vsd_jax.resolved import INIT_HEADS, METHODS, as_resolved  # noqa: F401 (the choices, named here too)


def build_method(config, target, vocab) -> Method:
  """config.method -> Method for `target` and the draft vocabulary `vocab` (models.draft_vocab); with
  config.draft.init_from, the draft starts from that trained draft instead of a random init. `config`: a ConfigDict
  (resolved here: a ConfigError names a bad field) or a `vsd_jax.resolved.Resolved`. The Method's
  heldout_metrics_fn is the held-out report's measurement (`vsd_jax.methods.vsd.loss.make_heldout_metrics`), the
  same for every method."""
  from vsd_jax.methods.vsd.loss import make_heldout_metrics

  settings = as_resolved(config)
  method = importlib.import_module(f"vsd_jax.methods.{settings.method}").build(settings, target, vocab)
  if settings.draft.init_head == "target":
    method.init_params = _head_from_target(method.init_params, target, vocab)
  if settings.draft.init_from:
    method.init_params = _init_from(settings.draft.init_from, method.init_params, target, vocab)
  method.heldout_metrics_fn = make_heldout_metrics(settings, target, method.draft)
  return method


def _replace_boxed(tree, path: tuple, value):
  """tree (Flax params, maybe boxed) with the leaf at `path` (dict keys) replaced by `value`, keeping its box."""
  import flax.linen as nn
  node = tree
  for k in path[:-1]:
    node = node[k]
  leaf = node[path[-1]]
  boxed = isinstance(leaf, nn.meta.AxisMetadata)
  shape = (leaf.unbox() if boxed else leaf).shape
  if shape != value.shape:
    raise ValueError(f"{'/'.join(path)}: shape {shape}, replacement {value.shape}")
  node[path[-1]] = leaf.replace_boxed(value) if boxed else value
  return tree


def _head_from_target(init_params: Callable, target, vocab) -> Callable:
  """init_params whose lm_head rows are the target's output rows of the draft-vocabulary tokens and whose final
  norm is the target's: the draft starts reading its hidden state the way the target reads its own, so it
  only has to learn to produce that state (not also the map from states to tokens)."""
  import jax
  import jax.numpy as jnp

  from vsd_jax.models.draft_vocab import draft_vocab_ids
  from vsd_jax.models.features import language_model_params, output_matrix

  out = output_matrix(target.params, target.config.tie_word_embeddings)
  ids = draft_vocab_ids(jnp.asarray(vocab.d2t, jnp.int32))
  kernel, scale = jnp.take(out, ids, axis=0).T, language_model_params(target.params)["norm"]["scale"]

  def init(rng):
    params = init_params(rng)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    params = _replace_boxed(params, ("lm_head", "kernel"), kernel.astype(dtype))
    return _replace_boxed(params, ("norm", "scale"), scale.astype(dtype))

  return init


def _init_from(directory: str, init_params: Callable, target, vocab) -> Callable:
  """init_params that returns the trained draft in `directory` (same boxes/logical axes as a fresh init)."""
  import flax.linen as nn
  import jax
  import numpy as np

  from vsd_jax.weights.draft_io import DraftMismatchError, load_draft

  _, loaded, d2t, _ = load_draft(directory, target.config)
  if d2t.shape != np.shape(vocab.d2t) or not np.array_equal(d2t, np.asarray(vocab.d2t)):
    raise DraftMismatchError(
        f"draft.init_from={directory!r} was trained with another draft vocabulary ({d2t.shape[0]} tokens) than "
        f"this run's ({np.shape(vocab.d2t)[0]}); use the same data and data.draft_vocab_size, or train from scratch")

  def init(rng):
    fresh = init_params(rng)
    # A draft trained without the vision adaptor (e.g. the text stage of configs/llava.py) starts a run with it:
    # the adaptor keeps its fresh init (its zero fuse projection leaves the loaded draft's outputs unchanged).
    adaptor = fresh.get("vision_adaptor") if "vision_adaptor" not in loaded else None
    body = {k: v for k, v in fresh.items() if k != "vision_adaptor"} if adaptor is not None else fresh
    want = jax.tree_util.tree_structure(nn.unbox(body))
    if jax.tree_util.tree_structure(loaded) != want:
      extra = " (it has a vision adaptor: set draft.vision_adaptor=True)" if "vision_adaptor" in loaded else ""
      raise DraftMismatchError(f"draft.init_from={directory!r} holds parameters of another draft architecture{extra}")
    leaves = iter(jax.tree_util.tree_leaves(loaded))
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    out = jax.tree_util.tree_map(
        lambda x: x.replace_boxed(next(leaves)) if is_box(x) else next(leaves), body, is_leaf=is_box)
    return out if adaptor is None else dict(out, vision_adaptor=adaptor)

  return init

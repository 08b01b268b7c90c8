"""The EAGLE-3 and VSD train steps (tiny target + draft) on 8 CPU devices: meshes give the single-device losses."""

from tests.multidevice import needs_8_devices

import json
import os
import types

import jax
import numpy as np
import pytest

from tests.tiny_models import tiny_target, vocab_maps
from vsd_jax import parallel
from vsd_jax.config_base import base_config
from vsd_jax.methods import build_method
from vsd_jax.training.trainer import train_loop

pytestmark = pytest.mark.slow  # 3 train steps with compilation on each of 4 meshes, per method

B, T = 8, 16
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _batches(start_step):
  """The same padded batch every step (so the loss must fall), independent of start_step."""
  while True:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, (B, T)).astype(np.int32)
    lens = rng.integers(10, T + 1, B)
    valid = (np.arange(T)[None, :] < lens[:, None]).astype(np.int32)
    loss_mask = valid * (np.arange(T)[None, :] >= 4)
    yield dict(input_ids=ids * valid, loss_mask=loss_mask.astype(np.int32), attention_mask=valid)


def _metrics_by_mesh(tmp_path, configure, keys):
  """3 steps of config.method on each mesh, the target sharded as in training -> {mesh shape: [3, len(keys)]
  logged metrics}."""
  model, params = tiny_target()
  target = types.SimpleNamespace(model=model, params=params, config=model.cfg)
  d2t, t2d = vocab_maps(8, range(2, 8))
  vocab = types.SimpleNamespace(d2t=np.asarray(d2t), t2d=np.asarray(t2d))
  out = {}
  for shape in MESHES:
    c = base_config()
    c.workdir = str(tmp_path / "x".join(map(str, shape)))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = shape
    c.train.update(dict(lr=3e-3, warmup_steps=1, total_steps=3, log_every=1, checkpoint_every=10,
                        progress_bar=False, batch_size=B))
    configure(c)
    method = build_method(c, target, vocab)
    mesh = parallel.make_mesh(c, jax.devices()[:int(np.prod(shape))])
    # The target placed as vsd_jax/train.py places it: sharded by its logical axes, not replicated.
    frozen_sh = parallel.target_frozen_shardings(method.frozen, model, mesh, parallel.logical_axis_rules(c))
    if shape == (2, 2, 2):
      emb = frozen_sh["target"]["embed_tokens"]["embedding"]
      assert emb.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), emb  # [vocab, embed]
    res = train_loop(c, method.loss_fn, method.init_params, method.frozen, _batches, mesh=mesh,
                     frozen_shardings=frozen_sh, method_state=method.method_state)
    assert res.step == 3
    with open(os.path.join(c.workdir, "metrics.jsonl")) as f:
      out[shape] = np.array([[json.loads(line)[k] for k in keys] for line in f])
  return out


@needs_8_devices
def test_eagle3_step_is_mesh_invariant(tmp_path):
  def configure(c):
    c.draft.ttt_steps = 3

  losses = _metrics_by_mesh(tmp_path, configure, ["loss"])
  ref = losses[(1, 1, 1)][:, 0]
  assert len(ref) == 3 and np.all(np.isfinite(ref)) and ref[2] < ref[0]
  for shape, l in losses.items():
    np.testing.assert_allclose(l[:, 0], ref, rtol=1e-4, err_msg=str(shape))


@needs_8_devices
def test_vsd_step_is_mesh_invariant(tmp_path):
  """The VSD step (path sampling, oracle, MH E-step, ARW + CAR + EAGLE-3) on the same meshes."""
  def configure(c):
    c.method = "vsd"
    c.draft.ttt_steps = 2
    c.vsd.update(dict(depth=3, num_paths=4, num_anchors=2, burn_in=1))

  metrics = _metrics_by_mesh(tmp_path, configure, ["loss", "loss_arw", "mean_u"])
  ref = metrics[(1, 1, 1)]
  assert ref.shape == (3, 3) and np.all(np.isfinite(ref))
  for shape, m in metrics.items():
    np.testing.assert_allclose(m, ref, rtol=1e-4, atol=1e-6, err_msg=str(shape))

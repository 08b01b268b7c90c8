"""Bad input to speculative decoding: tree settings, cache capacity, a draft for another target."""

import jax
import numpy as np
import pytest

from vsd_jax.decoding.runner import PromptTooLongError, check_capacity
from vsd_jax.decoding.speculative import required_slots
from vsd_jax.decoding.tree import TreeConfig
from vsd_jax.models.llama import LlamaConfig


def test_tree_settings_out_of_range():
  with pytest.raises(ValueError, match="must be >= 1"):
    TreeConfig(depth=0)
  with pytest.raises(ValueError, match="total_tokens=100 exceeds the 12 candidates"):
    TreeConfig(depth=2, top_k=3, total_tokens=100)
  with pytest.raises(ValueError, match="'beam' is not 'tree' or 'chain'"):
    TreeConfig(mode="beam")


def test_tree_larger_than_cache_allows():
  tree = TreeConfig(depth=6, top_k=8, total_tokens=60)
  extra = required_slots(0, 0, tree)
  assert extra >= 61 + 6
  with pytest.raises(PromptTooLongError, match="draft slots.*allows 256"):
    check_capacity([150], 64, 256, extra=extra)


def test_draft_for_another_target(tiny_draft, tmp_path):
  from vsd_jax.errors import InputNotFoundError
  from vsd_jax.weights.draft_io import DraftMismatchError, load_draft
  directory, (dcfg, dp, d2t, t2d, tcfg) = tiny_draft
  cfg2, dp2, d2t2, t2d2 = load_draft(str(directory), tcfg)  # round trip
  assert cfg2 == dcfg and np.array_equal(d2t2, np.asarray(d2t)) and np.array_equal(t2d2, np.asarray(t2d))
  for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(DraftMismatchError, match=r"hidden_size: draft 32 vs target 576.*num_layers: draft 4 vs "
                                                r"target 30.*vocab_size: draft 8 vs target 49152"):
    load_draft(str(directory), LlamaConfig())
  with pytest.raises(InputNotFoundError, match="no trained draft"):  # a FileNotFoundError the CLIs report cleanly
    load_draft(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
  """A random draft of the tiny target, saved once: (directory, save_draft's arguments but the directory)."""
  from tests.tiny_models import init_draft_params, tiny_target, vocab_maps
  from vsd_jax.models.eagle3 import Eagle3Config
  from vsd_jax.weights.draft_io import save_draft
  model, params = tiny_target()
  dcfg = Eagle3Config.from_target(model.cfg, draft_vocab_size=6)
  dp = init_draft_params(dcfg, jax.random.PRNGKey(0), params["embed_tokens"]["embedding"])
  args = (dcfg, dp, *vocab_maps(8, range(2, 8)), model.cfg)
  directory = tmp_path_factory.mktemp("draft")
  save_draft(str(directory), *args)
  return directory, args


def _copy(tiny_draft, tmp_path):
  import shutil
  shutil.copytree(tiny_draft[0], tmp_path, dirs_exist_ok=True)
  return tiny_draft[1][-1]  # the target's config


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
@pytest.mark.parametrize("name", ["draft.msgpack", "vocab.npz"])
def test_damaged_draft_names_the_file(tiny_draft, tmp_path, damage, name):
  """An interrupted export or a corrupted copy: load_draft names the file and says to re-export (sha256 manifest)."""
  from vsd_jax.errors import UserError
  from vsd_jax.weights.draft_io import DraftCorruptError, load_draft
  tcfg = _copy(tiny_draft, tmp_path)
  path = tmp_path / name
  data = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(data[:len(data) // 2])
  elif damage == "flip_byte":
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit off
  else:
    path.unlink()
  with pytest.raises(DraftCorruptError, match=rf"{name}.*(truncated|corrupted|missing).*re-export") as e:
    load_draft(str(tmp_path), tcfg)
  assert str(path) in str(e.value) and isinstance(e.value, UserError)


def test_cut_manifest_names_it(tiny_draft, tmp_path):
  from vsd_jax.weights.draft_io import MANIFEST, DraftCorruptError, load_draft
  tcfg = _copy(tiny_draft, tmp_path)
  (tmp_path / MANIFEST).write_text((tmp_path / MANIFEST).read_text()[:40])
  with pytest.raises(DraftCorruptError, match=rf"{tmp_path / MANIFEST}.*unreadable.*re-export"):
    load_draft(str(tmp_path), tcfg)


def test_interrupted_save_never_loads_mixed_files(tiny_draft, tmp_path, monkeypatch):
  """A save killed between its renames (the manifest is new, draft.msgpack still the old one) is reported by load,
  not loaded; other files in the directory are left alone; the old draft survives a save that stops earlier."""
  import os
  from vsd_jax.weights import draft_io
  tcfg = _copy(tiny_draft, tmp_path)
  dcfg, dp, d2t, t2d, _ = tiny_draft[1]
  other = jax.tree.map(lambda x: x + 1, dp)  # other weights, saved over the draft
  (tmp_path / "notes.txt").write_text("mine")
  old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  real_replace, calls = os.replace, []

  def dies_on(n):
    def replace(a, b):
      calls.append(b)
      if len(calls) == n:
        raise KeyboardInterrupt("killed")
      real_replace(a, b)
    return replace

  monkeypatch.setattr(draft_io.os, "replace", dies_on(1))  # before any rename: the old draft is intact
  with pytest.raises(KeyboardInterrupt):
    draft_io.save_draft(str(tmp_path), dcfg, other, d2t, t2d, tcfg)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no temporary file left either
  draft_io.load_draft(str(tmp_path), tcfg)
  calls.clear()
  monkeypatch.setattr(draft_io.os, "replace", dies_on(2))  # the new manifest is in, the new weights are not
  with pytest.raises(KeyboardInterrupt):
    draft_io.save_draft(str(tmp_path), dcfg, other, d2t, t2d, tcfg)
  with pytest.raises(draft_io.DraftCorruptError, match="draft.msgpack"):
    draft_io.load_draft(str(tmp_path), tcfg)
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_draft_without_manifest_still_loads(data_root):
  """Drafts saved before manifests existed load as they did: the shipped GPU base draft has none."""
  import os
  from vsd_jax.weights.draft_io import MANIFEST, load_draft
  shipped = os.path.join(data_root, "..", "drafts", "smollm2-eagle3-gpu-1500", "draft")
  if not os.path.isdir(shipped):
    pytest.skip(f"shipped draft not found at {shipped}")
  assert not os.path.exists(os.path.join(shipped, MANIFEST))
  cfg, params, d2t, t2d = load_draft(shipped, LlamaConfig())  # the SmolLM2 target's shape
  assert d2t.shape == (cfg.draft_vocab_size,) and t2d.shape == (49152,) and t2d.sum() == cfg.draft_vocab_size

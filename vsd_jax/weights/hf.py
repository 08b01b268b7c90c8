"""Load an HF LLaMA-family or llava-hf LLaVA checkpoint directory (config.json + safetensors, or PyTorch .bin)."""

from __future__ import annotations

import glob
import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy reader reads BF16)
import numpy as np
from safetensors import safe_open

from vsd_jax.errors import InputNotFoundError
from vsd_jax.weights.convert import (config_from_hf_dict, llava_canonical_name, llava_config_from_hf_dict,
                                    params_from_hf)
# torch is imported only to read PyTorch .bin files: it is a test-only dependency (setup.py's test extra).


class _TensorIndex:
  """Lazy name -> numpy lookup over every weight file in a directory.

  rename: optional checkpoint name -> the name it is looked up by (e.g. convert.llava_canonical_name, one
  spelling for the names of every transformers version); two tensors may not map to one name.
  """

  def __init__(self, directory: str, rename=None):
    self.files = {}
    self._stored = {}  # looked-up name -> name in the file, where they differ
    rename = rename or (lambda k: k)

    def add(k, entry):
      name = rename(k)
      if name in self.files:
        raise ValueError(f"{directory!r} holds two tensors for {name!r}: {self._stored.get(name, name)!r} and {k!r}")
      self.files[name] = entry
      if name != k:
        self._stored[name] = k
      return name

    st = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if st:
      for f in st:
        with safe_open(f, framework="numpy") as h:
          for k in h.keys():
            add(k, ("st", f))
    elif bins:
      try:
        import torch  # noqa: F401
      except ImportError as e:
        raise ImportError(f"{directory!r} holds PyTorch .bin weights; install torch to read them, or convert "
                          "them to safetensors.") from e
      self._bins = {}
      for f in bins:
        sd = torch.load(f, map_location="cpu", weights_only=True)
        for k, v in sd.items():
          self._bins[add(k, ("bin", f))] = v
    else:
      raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {directory!r}.")
    self._open = {}

  def has(self, name):
    return name in self.files

  def get(self, name) -> np.ndarray:
    """The whole tensor, float32."""
    return self.get_slice(name, ())

  def get_slice(self, name, index: tuple) -> np.ndarray:
    """Block `index` (a tuple of slices; () = all) of a tensor, float32; safetensors read only that block."""
    if name not in self.files:
      raise ValueError(f"checkpoint has no tensor {name!r}")
    kind, f = self.files[name]
    if kind == "bin":
      return self._bins[name][tuple(index)].float().numpy()
    if f not in self._open:
      self._open[f] = safe_open(f, framework="numpy")
    h = self._open[f]
    name = self._stored.get(name, name)
    x = h.get_slice(name)[tuple(index)] if index else h.get_tensor(name)
    return x.astype(np.float32) if x.dtype != np.float32 else x


def read_config_json(directory: str, what: str, fix: str) -> dict:
  """directory/config.json as a dict; missing: InputNotFoundError "<what> has no config.json; <fix>"."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise InputNotFoundError(f"{what} has no config.json; {fix}")
  with open(path) as f:
    return json.load(f)


def open_hf_dir(directory: str, **config_overrides):
  """Returns (LlamaConfig, _TensorIndex) of an HF checkpoint directory; no tensor is read yet.

  A llava-hf directory (config.json model_type "llava") gives (models.llava.LlavaConfig, an index whose names
  are convert.llava_canonical_name's).
  """
  d = read_config_json(directory, repr(directory), "pass an HF checkpoint directory, a GGUF file or a registry name.")
  if d.get("model_type") == "llava":
    cfg = llava_config_from_hf_dict(d, **config_overrides)
    index = _TensorIndex(directory, rename=llava_canonical_name)
    if not index.has("lm_head.weight") and not cfg.text.tie_word_embeddings:
      cfg = cfg.replace(text=cfg.text.replace(tie_word_embeddings=True))
    return cfg, index
  cfg = config_from_hf_dict(d, **config_overrides)
  index = _TensorIndex(directory)
  if not index.has("lm_head.weight") and not cfg.tie_word_embeddings:
    cfg = cfg.replace(tie_word_embeddings=True)
  return cfg, index


def read_hf_dir(directory: str, **config_overrides):
  """Returns (LlamaConfig, params numpy pytree) from an HF checkpoint directory."""
  cfg, index = open_hf_dir(directory, **config_overrides)
  return cfg, params_from_hf(cfg, index.get, index.has)


def load_processor(directory: str):
  """The checkpoint directory's transformers processor (e.g. LlavaProcessor), PIL backend; None when the
  directory has no processor files (processor_config.json / preprocessor_config.json)."""
  if not any(os.path.isfile(os.path.join(directory, f))
             for f in ("processor_config.json", "preprocessor_config.json")):
    return None
  from transformers import AutoProcessor  # transformers is heavy: only multimodal checkpoints pay for it
  return AutoProcessor.from_pretrained(directory, backend="pil")

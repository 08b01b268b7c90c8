"""Target weights: GGUF files, HF directories, registry names and hub ids."""
from vsd_jax.weights.registry import REGISTRY, HubUnreachableError, Target, load_target

__all__ = ["REGISTRY", "HubUnreachableError", "Target", "load_target"]

"""Target weights: GGUF files, HF directories, registry names and hub ids."""
from vsd_jax.weights.registry import (REGISTRY, HubUnreachableError, Target, decoding_load_options,
                                      load_target, untie_vocab_projection)

__all__ = ["REGISTRY", "HubUnreachableError", "Target", "decoding_load_options", "load_target",
           "untie_vocab_projection"]

"""Decoding: sampling, vanilla generation, (speculative) tree decoding."""

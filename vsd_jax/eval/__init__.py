"""Evaluation: vanilla vs speculative decoding on the same prompts, in the same process."""

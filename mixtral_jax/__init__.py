"""mixtral_jax: Mixtral (sparse mixture of experts) in JAX/Flax NNX.

Example:
  >>> from flax import nnx
  >>> from configs import tiny
  >>> config = mixtral_jax.ModelConfig.from_dict(tiny.get_config())
  >>> model = mixtral_jax.Mixtral(config, rngs=nnx.Rngs(0))
  >>> logits = model(tokens)  # int [B, T] -> [B, T, V]
  >>> model = mixtral_jax.load("converted/")  # from tools/convert.py
  >>> out = mixtral_jax.generate(model, mixtral_jax.load_tokenizer("converted/"), "Hi")

The package is laid out by role, each room importing only the ones below it:

    params.py     a model's parameters by path, which every room names them by
    parallel/     logical axis rules, meshes, placement, many hosts
    model/        config, layers, attention, routing, SMoE, the decoder, tokenizer
    quant/        whole-model int8 / int4 quantization
    checkpoints/  PyTorch sources, the Hub key table, our Orbax store, load, convert
    backends/     how a decode step runs on the devices at hand (the CPU's kernels)
    inference/    sampling, generation
    training/     data, steps, the training loop, LoRA, metrics, evaluation
    analysis/     routing analysis and its figures (`.[plots]`)
    planning/     TPU plans: the steps compiled for a slice

`generate.py`, `train.py`, `evaluate.py` and `routing.py` are the `python -m`
commands; `cli.py` is what they share.
"""

from mixtral_jax.parallel import devices as _devices

# Before JAX starts its backends: a machine without a TPU never starts libtpu.
_devices.skip_absent_tpu()

from mixtral_jax.checkpoints.load import load, load_tokenizer  # noqa: E402
from mixtral_jax.inference.generate import Generation, generate, generate_tokens  # noqa: E402
from mixtral_jax.model.config import ConfigError, ModelConfig  # noqa: E402
from mixtral_jax.model.mixtral import Mixtral, ModelOutput  # noqa: E402
from mixtral_jax.model.tokenizer import Tokenizer  # noqa: E402

__all__ = [
    "ConfigError",
    "Generation",
    "Mixtral",
    "ModelConfig",
    "ModelOutput",
    "Tokenizer",
    "generate",
    "generate_tokens",
    "load",
    "load_tokenizer",
]
__version__ = "0.1.0"

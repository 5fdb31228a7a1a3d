"""mixtral_jax: Mixtral (sparse mixture of experts) in JAX/Flax NNX.

Example:
  >>> from flax import nnx
  >>> from configs import tiny
  >>> config = mixtral_jax.ModelConfig.from_dict(tiny.get_config())
  >>> model = mixtral_jax.Mixtral(config, rngs=nnx.Rngs(0))
  >>> logits = model(tokens)  # int [B, T] -> [B, T, V]
  >>> model = mixtral_jax.load("converted/")  # from tools/convert.py
  >>> out = mixtral_jax.generate(model, mixtral_jax.load_tokenizer("converted/"), "Hi")
"""

from mixtral_jax.checkpoint import load, load_tokenizer
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.generate import Generation, generate
from mixtral_jax.model import Mixtral, ModelOutput
from mixtral_jax.tokenizer import Tokenizer

__all__ = [
    "ConfigError",
    "Generation",
    "Mixtral",
    "ModelConfig",
    "ModelOutput",
    "Tokenizer",
    "generate",
    "load",
    "load_tokenizer",
]
__version__ = "0.1.0"

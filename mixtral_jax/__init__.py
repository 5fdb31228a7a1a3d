"""mixtral_jax: Mixtral (sparse mixture of experts) in JAX/Flax NNX.

Example:
  >>> from flax import nnx
  >>> from configs import tiny
  >>> config = mixtral_jax.ModelConfig.from_dict(tiny.get_config())
  >>> model = mixtral_jax.Mixtral(config, rngs=nnx.Rngs(0))
  >>> logits = model(tokens)  # int [B, T] -> [B, T, V]
"""

from mixtral_jax.checkpoint import load, load_tokenizer
from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.model import Mixtral, ModelOutput

__all__ = ["ConfigError", "Mixtral", "ModelConfig", "ModelOutput", "load", "load_tokenizer"]
__version__ = "0.1.0"

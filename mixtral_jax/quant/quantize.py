"""Quantizing a whole Mixtral, a piece at a time or all at once, and back to floats.

The quantized weight type and the einsum that reads it are part of the model
(`model.quantized`); this room turns float weights into it: a float model into its
quantized copy (`quantize_model`), a checkpoint slice as conversion and loading
stream it (`quantize_slice`, `jit_quantize`), and quantized parameters back into
the float weights they stand for (`dequantize_params`, for a merged QLoRA export).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.model import attention, moe, quantized
from mixtral_jax.model.config import ModelConfig
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.params import flat_params, set_params


@functools.cache
def jit_quantize(spec: str, scheme: str, group_size: int, out_shardings=None):
    """`model.quantized.quantize` jitted, W -> (qvalue, scale), placed by `out_shardings`
    when given."""

    def parts(w):
        q = quantized.quantize(w, spec, scheme, group_size)
        return q.qvalue, q.scale

    return jax.jit(parts, out_shardings=out_shardings)


def weight_specs() -> dict[str, str]:
    """{"q_proj": "BTD,DNH->BTNH", ..., "w2": "EGCF,EFD->EGCD"}: every quantizable weight."""
    return {**attention.SPECS, **moe.SPECS}


def split_path(path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """(weight path, part) for a quantized weight's parameter path, else None."""
    if len(path) > 1 and path[-1] in quantized.PARTS and path[-2] in weight_specs():
        return path[:-1], path[-1]
    return None


def quantize_slice(
    config: ModelConfig, path: tuple[str, ...], value: np.ndarray | jax.Array
) -> dict[tuple[str, ...], np.ndarray]:
    """{path + ("qvalue",): ..., path + ("scale",): ...} of a float weight slice (any
    leading layer/expert axes cut away) on the host, or {path: value} for the weights
    that stay float."""
    name = path[-1]
    if not config.quantized(name):
        return {path: value}
    fn = jit_quantize(weight_specs()[name], config.quantization, config.quant_group_size)
    qvalue, scale = fn(jnp.asarray(value))
    return {path + ("qvalue",): np.asarray(qvalue), path + ("scale",): np.asarray(scale)}


def dequantize_params(params: dict[tuple[str, ...], jax.Array], dtype: jnp.dtype) -> dict:
    """Flat parameters with every quantized weight's qvalue and scale replaced by the
    float weight (in `dtype`) they stand for; the others unchanged."""
    out = {}
    for path, value in params.items():
        split = split_path(path)
        if split is None:
            out[path] = value
        elif split[1] == "qvalue":
            w = quantized.dequantize(value, params[(*split[0], "scale")], dtype)
            grouped = value.dtype == jnp.int4
            out[split[0]] = quantized.merge_groups(w, weight_specs()[path[-2]]) if grouped else w
    return out


def quantize_model(model: nnx.Module, scheme: str, group_size: int = 128) -> nnx.Module:
    """A quantized copy of a float model: its projections and experts as `scheme`
    ("int8" | "int4"), everything else shared with `model`."""
    if model.config.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.config.quantization})")
    config = model.config.replace(quantization=scheme, quant_group_size=group_size)
    copy = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    params: dict = {}
    for path, value in flat_params(model).items():
        if config.quantized(path[-1]):
            qvalue, scale = jit_quantize(weight_specs()[path[-1]], scheme, group_size)(value)
            params |= {path + ("qvalue",): qvalue, path + ("scale",): scale}
        else:
            params[path] = value
    set_params(copy, params)
    return copy

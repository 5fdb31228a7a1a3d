"""Weight-only int8 / int4 quantization on qwix: the projections and the experts
store integers and scales; the router, norms, embedding and LM head stay float.

A weight W used as einsum(spec, x, W) (attention.SPECS, moe.SPECS) is stored as
qwix's QArray, W ~ qvalue * scale, with symmetric absmax scales:

    qvalue  int8 | int4  W's shape                        w1 [L, E, D, F]
    scale   float32      W's shape, input axes reduced:
              int8: to 1, one scale per output channel    w1 [L, E, 1, F]
              int4: the last input axis in groups of g    w1 [L, E, D/g, F]
                    (`quant_group_size`), other input      o_proj [L, N, H/g, D]
                    axes kept (per head for o_proj)

Axes in front of the spec's (the stacked layers) get their own scales, so a
layer or an expert quantized alone gets the numbers it gets in the stack:
conversion and loading quantize one piece at a time. The router is never
quantized: its rounding would flip top-2 choices, i.e. which experts run.

On disk (checkpoint.py) int4 values are packed two per byte along the last axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import ModelConfig

try:
    import qwix

    QArray = qwix.QArray
except ImportError:  # Python 3.10: qwix needs Flax 0.12+ (config.py refuses quantization)
    qwix = None
    QArray = ()  # isinstance(x, ()) is False

QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
# A quantized weight's parameters: (..., name, "qvalue") and (..., name, "scale").
PARTS = ("qvalue", "scale")


def _how(spec: str, ndim: int, scheme: str, group_size: int) -> dict:
    """qwix's channelwise and tiled axes for a weight of `ndim` axes used in `spec`,
    aligned from the right (leading extra axes are the stacked layers)."""
    inputs, out = spec.split("->")
    x_sub, w_sub = inputs.split(",")
    offset = ndim - len(w_sub)
    contracted = [offset + i for i, a in enumerate(w_sub) if a in x_sub and a not in out]
    channelwise = [i for i in range(ndim) if i not in contracted]
    tiled = {}
    if scheme == "int4":
        *kept, grouped = contracted
        channelwise += kept
        tiled = {grouped: group_size}
    return {"channelwise_axes": tuple(sorted(channelwise)), "tiled_axes": tiled}


def quantize(w: jax.Array, spec: str, scheme: str, group_size: int) -> QArray:
    """W as qwix.QArray (qvalue int8/int4, scale float32) for its use in `spec`."""
    how = _how(spec, w.ndim, scheme, group_size)
    return qwix.quantize(w.astype(jnp.float32), QTYPES[scheme], **how)


@functools.cache
def jit_quantize(spec: str, scheme: str, group_size: int, out_shardings=None):
    """`quantize` jitted, W -> (qvalue, scale), placed by `out_shardings` when given."""

    def parts(w):
        q = quantize(w, spec, scheme, group_size)
        return q.qvalue, q.scale

    return jax.jit(parts, out_shardings=out_shardings)


class QuantizedWeight(nnx.Module):
    """A frozen weight stored as qvalue and scale parameters, with W's logical axes
    (a scale axis of size 1 is not split over devices)."""

    def __init__(
        self, w: jax.Array, spec: str, axes: tuple[str | None, ...], scheme: str, group_size: int
    ):
        q = quantize(w, spec, scheme, group_size)
        scale_axes = tuple(a if n > 1 else None for a, n in zip(axes, q.scale.shape, strict=True))
        self.qvalue = nnx.Param(q.qvalue, out_sharding=axes, eager_sharding=False)
        self.scale = nnx.Param(q.scale, out_sharding=scale_axes, eager_sharding=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.shape)

    def qarray(self, dtype: jnp.dtype) -> QArray:
        """The weight as qwix.QArray, dequantizing to `dtype` (the scale's dtype)."""
        return qwix.QArray(self.qvalue[...], self.scale[...].astype(dtype))


def einsum(spec: str, x: jax.Array, weight: nnx.Param | QuantizedWeight) -> jax.Array:
    """einsum(spec, x, W) in x's dtype for a float or a quantized W."""
    if isinstance(weight, QuantizedWeight):
        # qwix dequantizes W into the matmul's operand (XLA fuses it on TPU) because
        # x is float: the weights are read as integers, the math is x's dtype.
        return qwix.einsum(spec, x, weight.qarray(x.dtype))
    return jnp.einsum(spec, x, weight[...].astype(x.dtype))


def weight_specs() -> dict[str, str]:
    """{"q_proj": "BTD,DNH->BTNH", ..., "w2": "EGCF,EFD->EGCD"}: every quantizable weight."""
    from mixtral_jax import attention, moe  # local: both import layers, which imports us

    return {**attention.SPECS, **moe.SPECS}


def split_path(path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """(weight path, part) for a quantized weight's parameter path, else None."""
    if len(path) > 1 and path[-1] in PARTS and path[-2] in weight_specs():
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


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """qvalue * scale (scale broadcast over its groups) in `dtype`."""
    return qwix.dequantize(qwix.QArray(qvalue, scale.astype(dtype)))


def dequantize_params(params: dict[tuple[str, ...], jax.Array], dtype: jnp.dtype) -> dict:
    """Flat parameters with every quantized weight's qvalue and scale replaced by the
    float weight (in `dtype`) they stand for; the others unchanged."""
    out = {}
    for path, value in params.items():
        split = split_path(path)
        if split is None:
            out[path] = value
        elif split[1] == "qvalue":
            out[split[0]] = dequantize(value, params[(*split[0], "scale")], dtype)
    return out


def quantize_model(model: nnx.Module, scheme: str, group_size: int = 128) -> nnx.Module:
    """A quantized copy of a float model: its projections and experts as `scheme`
    ("int8" | "int4"), everything else shared with `model`."""
    from mixtral_jax.model import Mixtral
    from mixtral_jax.weights import flat_params, set_params

    if model.config.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.config.quantization})")
    config = model.config.replace(quantization=scheme, quant_group_size=group_size)
    quantized = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    params: dict = {}
    for path, value in flat_params(model).items():
        if config.quantized(path[-1]):
            qvalue, scale = jit_quantize(weight_specs()[path[-1]], scheme, group_size)(value)
            params |= {path + ("qvalue",): qvalue, path + ("scale",): scale}
        else:
            params[path] = value
    set_params(quantized, params)
    return quantized


def pack_int4(values: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """int4 [..., 2n] -> uint8 [..., n]: element 2i in the low nibble, 2i + 1 in the
    high. Device arrays are packed where they lie."""
    xp = jnp if isinstance(values, jax.Array) else np
    v = values.astype(xp.int8).astype(xp.uint8)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_int4`, on the device: uint8 [..., n] -> int4 [..., 2n]."""
    low = ((packed & 0x0F) ^ 8).astype(jnp.int8) - 8  # sign-extend a nibble
    high = ((packed >> 4) ^ 8).astype(jnp.int8) - 8
    both = jnp.stack([low, high], axis=-1)  # [..., n, 2]
    return both.reshape(*packed.shape[:-1], 2 * packed.shape[-1]).astype(jnp.int4)

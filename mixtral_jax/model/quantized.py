"""The model's weights as einsums: a float parameter, or int8 / int4 integers and
scales (weight-only quantization on qwix), read by one `einsum`.

The projections and the experts may store integers and scales; the router, norms,
embedding and LM head stay float. Turning a float model into a quantized one is
`mixtral_jax.quant`'s job; this module is the weight type and the math that reads it.

A weight W used as einsum(spec, x, W) (attention.SPECS, moe.SPECS) is stored as
qwix's QArray, W ~ qvalue * scale, with symmetric absmax scales:

    int8  qvalue  W's shape                               w1 [L, E, D, F]
          scale   input axes reduced to 1: one scale      w1 [L, E, 1, F]
                  per output channel
    int4  qvalue  the last input axis split in groups     w1 [L, E, D/g, g, F]
                  of g (`quant_group_size`)                o_proj [L, N, H/g, g, D]
          scale   one per group and output (other input   w1 [L, E, D/g, 1, F]
                  axes kept: per head for o_proj)         o_proj [L, N, H/g, 1, D]

Scales are float32. int4 is stored split (not as W's shape with scales broadcast
over groups) because only then does the TPU compiler fuse the dequantization into
the matmul (see `quantize`).

Axes in front of the spec's (the stacked layers) get their own scales, so a
layer or an expert quantized alone gets the numbers it gets in the stack:
conversion and loading quantize one piece at a time. The router is never
quantized: its rounding would flip top-2 choices, i.e. which experts run.

On disk (`mixtral_jax.quant.int4`) int4 values are packed two per byte along the last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

try:
    import qwix

    QArray = qwix.QArray
except ImportError:  # Python 3.10: qwix needs Flax 0.12+ (config.py refuses quantization)
    qwix = None
    QArray = ()  # isinstance(x, ()) is False

QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
# A quantized weight's parameters: (..., name, "qvalue") and (..., name, "scale").
PARTS = ("qvalue", "scale")


def einsum_parts(spec: str) -> tuple[str, str, str]:
    """ "BTD,DNH->BTNH" -> ("BTD", "DNH", "BTNH"): x's, W's and the output's axes."""
    inputs, out = spec.split("->")
    x_sub, w_sub = inputs.split(",")
    return x_sub, w_sub, out


def _grouped_letter(spec: str) -> str:
    """The letter of W's last input (contracted) axis: int4 groups run along it."""
    x_sub, w_sub, out = einsum_parts(spec)
    return [a for a in w_sub if a in x_sub and a not in out][-1]


def _from_right(spec: str) -> int:
    """How far from W's last axis its grouped axis is (0: the last)."""
    w_sub = einsum_parts(spec)[1]
    return len(w_sub) - 1 - w_sub.index(_grouped_letter(spec))


def split_groups(w: jax.Array, spec: str, group_size: int) -> jax.Array:
    """int4's layout: W's grouped axis of n inputs split into (n / g, g)."""
    i = w.ndim - 1 - _from_right(spec)
    return w.reshape(*w.shape[:i], w.shape[i] // group_size, group_size, *w.shape[i + 1 :])


def without_within(entries: tuple, spec: str) -> tuple:
    """Per-axis entries (e.g. a PartitionSpec's) of an int4 stored layout without the
    within-group axis: those of W."""
    i = len(entries) - 1 - _from_right(spec)
    return (*entries[:i], *entries[i + 1 :])


def merge_groups(w: jax.Array, spec: str) -> jax.Array:
    """The inverse of `split_groups`."""
    i = w.ndim - 2 - _from_right(spec)
    return w.reshape(*w.shape[:i], w.shape[i] * w.shape[i + 1], *w.shape[i + 2 :])


def quantize(w: jax.Array, spec: str, scheme: str, group_size: int) -> QArray:
    """W as qwix.QArray (qvalue int8/int4, scale float32) for its use in `spec`, in the
    layout it is stored in: int8 as W, one scale per output (every axis but the
    contracted ones, leading stacked axes included); int4 with the grouped axis split
    (`split_groups`), one scale per group and output (every axis but the within-group
    one). The split is what lets the TPU compiler fuse the dequantization into the
    matmul: with one axis of n inputs and scales broadcast over groups it writes the
    dequantized weight out first, more bytes than the bfloat16 weight it replaces
    (docs/quantization.md)."""
    w = w.astype(jnp.float32)
    if scheme == "int4":
        w = split_groups(w, spec, group_size)
        within = w.ndim - 1 - _from_right(spec)
        return qwix.quantize(w, QTYPES[scheme], channelwise_axes=_all_but(w.ndim, [within]))
    x_sub, w_sub, out = einsum_parts(spec)
    offset = w.ndim - len(w_sub)
    contracted = [offset + i for i, a in enumerate(w_sub) if a in x_sub and a not in out]
    return qwix.quantize(w, QTYPES[scheme], channelwise_axes=_all_but(w.ndim, contracted))


def _all_but(ndim: int, axes: list[int]) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i not in axes)


class QuantizedWeight(nnx.Module):
    """A frozen weight stored as qvalue and scale parameters (`quantize`'s layout) with
    W's logical axes (int4's within-group axis and scale axes of size 1 are not split
    over devices)."""

    def __init__(
        self, w: jax.Array, spec: str, axes: tuple[str | None, ...], scheme: str, group_size: int
    ):
        self.spec, self.scheme, self.weight_shape = spec, scheme, tuple(w.shape)
        q = quantize(w, spec, scheme, group_size)
        if scheme == "int4":
            i = len(axes) - _from_right(spec)  # the within-group axis
            axes = (*axes[:i], None, *axes[i:])
        scale_axes = tuple(a if n > 1 else None for a, n in zip(axes, q.scale.shape, strict=True))
        self.qvalue = nnx.Param(q.qvalue, out_sharding=axes, eager_sharding=False)
        self.scale = nnx.Param(q.scale, out_sharding=scale_axes, eager_sharding=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """W's shape (not the stored layout's)."""
        return self.weight_shape

    def qarray(self, dtype: jnp.dtype) -> QArray:
        """The weight as qwix.QArray, dequantizing to `dtype` (the scale's dtype)."""
        return qwix.QArray(self.qvalue[...], self.scale[...].astype(dtype))


def einsum(spec: str, x: jax.Array, weight: nnx.Param | QuantizedWeight) -> jax.Array:
    """einsum(spec, x, W) in x's dtype for a float or a quantized W."""
    if not isinstance(weight, QuantizedWeight):
        return contract(spec, x, weight[...].astype(x.dtype))
    if weight.scheme == "int4":  # contract over (groups, within) as the weight is stored
        spec, x = grouped_spec(spec, x, weight.qvalue.shape)
    # qwix dequantizes W into the matmul's operand (XLA fuses it on TPU) because x is
    # float: the weights are read as integers, the math is in x's dtype.
    return qwix.einsum(spec, x, weight.qarray(x.dtype))


def contract(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w), contracting w's axes in the order they are stored.

    jnp.einsum contracts in alphabetical order: "BTNH,NHD->BTD" as (H, N), against the
    layout of both operands, and XLA:CPU then transposes the whole weight on every call.
    """
    x_sub, w_sub, out = einsum_parts(spec)
    contracted = [a for a in w_sub if a in x_sub and a not in out]
    batch = [a for a in w_sub if a in x_sub and a in out]
    dims = (
        ([x_sub.index(a) for a in contracted], [w_sub.index(a) for a in contracted]),
        ([x_sub.index(a) for a in batch], [w_sub.index(a) for a in batch]),
    )
    y = jax.lax.dot_general(x, w, dims)
    # dot_general's axes: the batch ones, then x's and w's remaining ones in order
    got = batch + [a for a in x_sub + w_sub if a not in contracted and a not in batch]
    return jnp.transpose(y, [got.index(a) for a in out])


def grouped_spec(spec: str, x: jax.Array, stored_shape: tuple[int, ...]):
    """`spec` and x for an int4 W stored with its grouped axis split in two: that axis
    of x is split alike and the spec names both halves."""
    x_sub, w_sub, out = einsum_parts(spec)
    letter = _grouped_letter(spec)
    pair = "".join([c for c in "ZYXWVUQPOJI" if c not in spec][:2])  # (groups, within)
    i = x_sub.index(letter)
    g = stored_shape[len(stored_shape) - 1 - _from_right(spec)]
    x = x.reshape(*x.shape[:i], x.shape[i] // g, g, *x.shape[i + 1 :])
    return f"{x_sub.replace(letter, pair)},{w_sub.replace(letter, pair)}->{out}", x


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """qvalue * scale (scale broadcast over its groups) in `dtype`, in the stored layout."""
    return qwix.dequantize(qwix.QArray(qvalue, scale.astype(dtype)))

"""Small building blocks: parameters with logical axes, LoRA adapters, RMSNorm,
embeddings, RoPE."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model.config import ModelConfig
from mixtral_jax.model.quantized import QuantizedWeight, einsum, einsum_parts


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: jnp.dtype,
    init: nnx.Initializer,
    kind: type[nnx.Param] = nnx.Param,
) -> nnx.Param:
    """A parameter whose `out_sharding` metadata holds *logical* axis names.

    Modules never mention devices: `mixtral_jax.parallel.rules` maps these names to
    mesh axes by rules from the config, so placement is metadata only here.
    """
    assert len(shape) == len(axes), (shape, axes)
    return kind(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def weight(
    rngs: nnx.Rngs,
    config: ModelConfig,
    name: str,
    shape: tuple[int, ...],
    specs: dict[str, str],
    axes: dict[str, tuple[str | None, ...]],
) -> nnx.Param | QuantizedWeight:
    """The weight `name` used as einsum(specs[name], x, W), with logical `axes[name]`: a
    float parameter, or integers and scales when the config quantizes it
    (`quantized.py`). The same seed draws the same W either way, so a quantized
    model is its float twin, rounded."""
    init = nnx.initializers.normal(config.initializer_range)
    if not config.quantized(name):
        return param(rngs, shape, axes[name], config.weight_dtype, init)
    w = init(rngs.params(), shape, config.weight_dtype)
    return QuantizedWeight(w, specs[name], axes[name], config.quantization, config.quant_group_size)


class LoRAParam(nnx.Param):
    """A low-rank adapter's parameter: what LoRA fine-tuning trains (`nnx.Param`s
    that are not `LoRAParam`s stay frozen)."""


class Adapter(nnx.Module):
    """LoRA for one weight W used as `einsum(spec, x, W)`: W + (alpha / r) A B.

    The factors are read off the weight's einsum: A keeps W's contracted (and
    shared) axes and ends in the rank R; B starts with the shared axes and R,
    then W's output axes. For "BTD,DNH->BTNH" that is A [D, R], B [R, N, H];
    for the experts' "EGCD,EDF->EGCF", A [E, D, R], B [E, R, F]. Applied to
    activations (x A) B, so the [D, F]-sized update is never built while training.
    B starts at zero: a fresh adapter leaves the model unchanged.

    With `bank` J > 0 the weight holds J adapters side by side (serving many at once),
    a bank axis J after W's shared axes: A [J, D, R], B [J, R, N, H]; the experts'
    A [E, J, D, R], B [E, J, R, F]. Each token then applies its own (`select`: its index,
    or one-hot weights; the adapters' scales are folded into their B when the bank is
    built: `checkpoints.adapters.load_bank`): every adapter's
    (x A_j) is computed and all but the token's are multiplied by zero, an extra
    J R (X + Y) of work per token for an [X, Y] weight, small beside X Y while J R is
    small beside X and Y (Punica's and S-LoRA's kernels gather each row's factors
    instead; einsums keep this layout for every device and mesh).
    """

    def __init__(
        self,
        spec: str,
        weight_shape: tuple[int, ...],
        weight_axes: tuple[str | None, ...],
        *,
        rank: int,
        alpha: float,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        bank: int = 0,
    ):
        x_sub, w_sub, out_sub = einsum_parts(spec)
        produced = "".join(a for a in w_sub if a not in x_sub)
        contracted = "".join(a for a in w_sub if a in x_sub and a not in out_sub)
        shared = "".join(a for a in w_sub if a in x_sub and a in out_sub)
        J = "J" if bank else ""  # the bank's axis (einsum_parts' specs never use J)
        a_sub = shared + J + "".join(a for a in w_sub if a in contracted) + "R"
        b_sub = shared + J + "R" + produced
        mid = "".join(a for a in x_sub if a not in contracted) + J + "R"
        self.spec_a, self.spec_b = f"{x_sub},{a_sub}->{mid}", f"{mid},{b_sub}->{out_sub}"
        self.spec_delta = f"...{a_sub},...{b_sub}->...{w_sub}"
        self.bank = bank
        self.shared_axes = len(shared)  # where a bank's J axis is, in A and B
        self.scale = alpha / rank
        size = dict(zip(w_sub, weight_shape, strict=True)) | {"R": rank, "J": bank}
        names = dict(zip(w_sub, weight_axes, strict=True)) | {"R": None, "J": None}
        fan_in = math.prod(size[a] for a in contracted)

        def factor(sub, init):
            shape = tuple(size[a] for a in sub)
            return param(rngs, shape, tuple(names[a] for a in sub), param_dtype, init, LoRAParam)

        self.a = factor(a_sub, nnx.initializers.normal(fan_in**-0.5))
        self.b = factor(b_sub, nnx.initializers.zeros)

    def __call__(self, x: jax.Array, select: jax.Array | None = None) -> jax.Array:
        """The adapter's contribution to einsum(spec, x, W). A bank's needs `select`,
        each token's adapter over x's axes but the contracted ones (`bank_weights`)."""
        h = jnp.einsum(self.spec_a, x, self.a[...].astype(x.dtype))
        if self.bank:
            if select is None:
                raise ValueError("a bank of adapters needs each token's choice (adapter_ids)")
            h = h * bank_weights(select, self.bank, x.dtype)[..., None]
            return jnp.einsum(self.spec_b, h, self.b[...].astype(x.dtype))
        y = jnp.einsum(self.spec_b, h, self.b[...].astype(x.dtype))
        return y * jnp.asarray(self.scale, x.dtype)

    def delta(self, layer: int | None = None) -> jax.Array:
        """(alpha / r) A B in W's layout (with any leading stacked axes), float32;
        with `layer`, of that layer of stacked factors only. Not for a bank."""
        if self.bank:
            raise ValueError("a bank of adapters has no one delta: merge each adapter alone")
        a, b = (p[...] if layer is None else p[...][layer] for p in (self.a, self.b))
        return (
            jnp.einsum(self.spec_delta, a.astype(jnp.float32), b.astype(jnp.float32)) * self.scale
        )


def attach_adapters(
    module: nnx.Module,
    config: ModelConfig,
    specs: dict[str, str],
    axes: dict[str, tuple[str | None, ...]],
    rngs: nnx.Rngs,
) -> None:
    """Sets `module.<name>_lora` for each weight `name` of `specs` (its einsum): an
    Adapter when the config targets it with LoRA, else None."""
    for name, spec in specs.items():
        adapter = None
        if config.lora(name):
            adapter = Adapter(
                spec,
                getattr(module, name).shape,
                axes[name],
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                param_dtype=jnp.float32,  # small, trained: float32 whatever the base's dtype
                rngs=rngs,
                bank=config.lora_bank,
            )
        setattr(module, f"{name}_lora", adapter)


def bank_weights(select: jax.Array, bank: int, dtype: jnp.dtype) -> jax.Array:
    """Each token's weight for each of a bank's adapters [..., J], from `select`: its
    adapter's index [...] (-1: none), or those weights already (floats [..., J], as the
    dense dispatch moves them with the tokens)."""
    if jnp.issubdtype(select.dtype, jnp.integer):
        return jax.nn.one_hot(select, bank, dtype=dtype)
    return select.astype(dtype)


def project(
    spec: str,
    x: jax.Array,
    weight: nnx.Param | QuantizedWeight,
    adapter: Adapter | None,
    select: jax.Array | None = None,
) -> jax.Array:
    """einsum(spec, x, W), plus the LoRA adapter's term when W has one (a bank's adapter
    each token `select`s, `Adapter`)."""
    y = einsum(spec, x, weight)
    return y if adapter is None else y + adapter(x, select)


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in float32 like the reference."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), param_dtype, nnx.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # The reference casts back before scaling; bf16 results depend on that order.
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(
        self, vocab_size: int, dim: int, *, std: float, param_dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.embedding = param(
            rngs, (vocab_size, dim), ("vocab", "embed"), param_dtype, nnx.initializers.normal(std)
        )

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)  # [B, T, D]


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the Hub's "rotate half" layout.

    x: [B, T, N, H]; positions: [B, T] integer positions (explicit, so that
    packed, padded and cached sequences rotate by their true position).
    Dimension i of the first half pairs with dimension i + H/2.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)

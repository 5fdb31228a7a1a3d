"""CPU kernels for a decode step (csrc/cpu_moe.cc), built on first use.

A decode step multiplies few rows by every weight: at batch 16, 16 rows by each
attention projection and the LM head, about 4 by each expert. XLA:CPU's library
matmuls read a weight well below the machine's read bandwidth with so few rows
(docs/cpu-decode.md has the figures). The kernels read each weight once, in order,
from a copy in column panels of `PANEL` floats, with the rows' sums in registers:

    experts  w13 [E, F/P, D, 2P]  panel j of w1 (gate) and of w3 (up), side by side
             w2  [E, D/P, F, P]   panel j of w2 (down)       (`experts`, `pack`)
             and a bank of LoRA adapters' factors as the model holds them, each row
             applying its own                                 (`experts_lora`)
    dense    w   [N/P, K, P]      panel j of a [K, N] weight  (`dense`, `pack_dense`):
             the LM head, and each layer's q, k and v side by side, and o

with widths rounded up to whole panels by zeros.

The copies are float32: they double float32 weights' memory (triple bfloat16
ones') while a model generates on a CPU. Each is made once per set of weights, and
only if it takes at most `MAX_FREE_FRACTION` of the memory available (`_packed`).

The shared library is compiled with the system's C++ compiler ($CXX, else c++)
for the machine it runs on, against the XLA FFI headers that jaxlib ships, and
cached in $MIXTRAL_JAX_CACHE (default ~/.cache/mixtral_jax). Without a compiler,
decode falls back to XLA's matmuls with one warning; MIXTRAL_JAX_CPU_MOE=0 turns
the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mixtral_jax.model.config import ModelConfig

PANEL = 16  # floats per column panel; csrc/cpu_moe.cc's P
SOURCE = Path(__file__).with_name("csrc") / "cpu_moe.cc"
TARGET = "mixtral_jax_cpu_moe"
LORA_TARGET = "mixtral_jax_cpu_moe_lora"
LORA_ROWS_TARGET = "mixtral_jax_cpu_lora_rows"
DENSE_TARGET = "mixtral_jax_cpu_dense"
ATTEND_TARGET = "mixtral_jax_cpu_attend"
ATTEND_INT8_TARGET = "mixtral_jax_cpu_attend_int8"
# Past this many rows per expert on average (batch x k / E) a step is compute-bound
# and XLA's library matmuls are as fast as the kernel (docs/cpu-decode.md).
MAX_MEAN_ROWS = 16
# The packed copy may take at most this fraction of the memory available when made.
MAX_FREE_FRACTION = 0.5
# The largest LoRA rank the kernels take: a row's x A lives on the stack, in
# csrc/cpu_moe.cc's kMaxRank floats, which hold q's, k's and v's side by side (3 x 256).
MAX_LORA_RANK = 256
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")


@struct.dataclass
class DenseKernel:
    """x [n, K] @ w [K, width] by the dense kernel, from w packed by `pack_dense`."""

    w: jax.Array  # [width / P, K, P], zero padded to whole panels
    width: int = struct.field(pytree_node=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x, self.w, self.width)


@struct.dataclass
class LoRARows:
    """A bank of J LoRA adapters on a dense weight [K, width], each row applying its own
    (`lora_rows`), on S segments of the weight's columns (q's, k's and v's adapters on
    their projections side by side; one segment for one weight): a [J, K, S R] and
    b [J, R, M], the segments' factors side by side, each adapter's alpha / r folded into
    its b; `columns` the segments' (begin, end) in the output, M wide in all."""

    a: jax.Array
    b: jax.Array
    columns: tuple[tuple[int, int], ...] = struct.field(pytree_node=False)
    width: int = struct.field(pytree_node=False)

    def __call__(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        return lora_rows(x, ids, self.a, self.b, self.columns, self.width)


def _rows_ids(ids: jax.Array | None, rows: int) -> jax.Array:
    """The rows' adapters of a bank (-1: none); without `ids`, adapter 0 (a model's one
    adapter, as `backends.cpu.decode` packs it)."""
    return jnp.zeros(rows, jnp.int32) if ids is None else ids.astype(jnp.int32)


class PackedAttention(NamedTuple):
    """One layer's attention projections for the dense kernel, their LoRA adapters for
    `lora_rows` if they have any, and the attention kernel between them: the model's
    `attention.Projections`."""

    qkv_weights: DenseKernel  # [D] -> q, k and v side by side [(N + 2K) H]
    o_weights: DenseKernel  # [N H] -> [D]
    # Their adapters (or a bank of them): q's, k's and v's as one, o's; None: none.
    adapters: tuple[LoRARows | None, LoRARows | None] = (None, None)

    def qkv(self, x: jax.Array, ids: jax.Array | None = None) -> jax.Array:
        y, bank = self.qkv_weights(x), self.adapters[0]
        return y if bank is None else y + bank(x, _rows_ids(ids, x.shape[0]))

    def o(self, x: jax.Array, ids: jax.Array | None = None) -> jax.Array:
        y, bank = self.o_weights(x), self.adapters[1]
        return y if bank is None else y + bank(x, _rows_ids(ids, x.shape[0]))

    def attend(self, q, keys, values, blocks, query_positions, key_positions, window, *scales):
        return attend(q, keys, values, blocks, query_positions, key_positions, window, *scales)


class PackedExperts(NamedTuple):
    """One layer's experts in the kernel's layout (see the module docstring): the
    model's `moe.ExpertsFn`, computing every expert's sorted rows."""

    w13: jax.Array  # [E, F/P, D, 2P]
    w2: jax.Array  # [E, D/P, F, P]

    def __call__(self, xs: jax.Array, start: jax.Array, count: jax.Array) -> jax.Array:
        return experts(xs, start, count, self)


class PackedExpertsLoRA(NamedTuple):
    """One layer's packed experts and a bank of adapters on them (`layers.Adapter`): the
    factors of w1, w3 and w2 as the model holds them, a1, b1, a3, b3, a2, b2
    ([E, J, D, R], [E, J, R, F], ..., [E, J, F, R], [E, J, R, D]). The model's
    `moe.ExpertsFn` for experts with a bank, each row applying its own adapter."""

    w13: jax.Array
    w2: jax.Array
    factors: tuple[jax.Array, ...]

    def __call__(
        self, xs: jax.Array, start: jax.Array, count: jax.Array, ids: jax.Array | None = None
    ) -> jax.Array:
        """`ids` [n]: the rows' adapters (-1: none); none: every row the base experts'."""
        ids = jnp.full(len(xs), -1, jnp.int32) if ids is None else ids
        return experts_lora(xs, start, count, self, ids)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(
            sorted({ln for ln in info.splitlines() if ln.startswith(("flags", "model name"))})
        )
    except OSError:
        return platform.processor() or platform.machine()


def default_cache_dir() -> Path:
    """Where mixtral_jax keeps what it compiles: $MIXTRAL_JAX_CACHE, else
    ~/.cache/mixtral_jax."""
    return Path(os.environ.get("MIXTRAL_JAX_CACHE", "~/.cache/mixtral_jax")).expanduser()


def build(
    compiler: str | None = None,
    cache_dir: str | Path | None = None,
    vector_floats: int | None = None,
) -> Path:
    """The kernel's shared library, compiled unless the cache has it for this source,
    jaxlib and CPU. `vector_floats` (8 or 16) sets the width the kernels compute in,
    else the CPU's own (16 with AVX-512, else 8). Raises RuntimeError (with the
    compiler's message) if it fails."""
    compiler = compiler or os.environ.get("CXX", "c++")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    include = jax.ffi.include_dir()
    flags = _FLAGS + ((f"-DMIXTRAL_JAX_VECTOR_FLOATS={vector_floats}",) if vector_floats else ())
    parts = (compiler, *flags, include, importlib.metadata.version("jaxlib"), _cpu_signature())
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(parts).encode()).hexdigest()
    library = cache / f"cpu_moe-{key[:16]}.so"
    if library.exists():
        return library
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX to one)")
    cache.mkdir(parents=True, exist_ok=True)
    # Compiled under a temporary name and renamed: a failed or concurrent build never
    # leaves a half-written library under the cached name.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        command = [compiler, *flags, f"-I{include}", str(SOURCE), "-o", partial]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def available() -> bool:
    """Whether the kernel is on: built, loaded and registered with XLA (once per process)."""
    if os.environ.get("MIXTRAL_JAX_CPU_MOE", "1") == "0":
        return False
    try:
        library = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        warnings.warn(
            f"mixtral_jax: the CPU decode kernel could not be built, so CPU decode uses "
            f"XLA's matmuls (slower at batch > 1): {error}. Install a C++ compiler, or set "
            "MIXTRAL_JAX_CPU_MOE=0 to silence this.",
            stacklevel=2,
        )
        return False
    register(library)
    return True


def register(library: ctypes.CDLL, variant: str = "") -> None:
    """Registers `library`'s kernels with XLA under their targets' names + `variant` (the
    calls below take the same `variant`: the tests run a second build beside the first)."""
    for target, handler in (
        (TARGET, library.MixtralCpuMoE),
        (LORA_TARGET, library.MixtralCpuMoELoRA),
        (LORA_ROWS_TARGET, library.MixtralCpuLoRARows),
        (DENSE_TARGET, library.MixtralCpuDense),
        (ATTEND_TARGET, library.MixtralCpuAttend),
        (ATTEND_INT8_TARGET, library.MixtralCpuAttendInt8),
    ):
        jax.ffi.register_ffi_target(target + variant, jax.ffi.pycapsule(handler), platform="cpu")


def experts(
    xs: jax.Array, start: jax.Array, count: jax.Array, packed: PackedExperts, *, variant: str = ""
) -> jax.Array:
    """xs [n, D] float32 rows sorted by expert; expert e owns rows start[e]..+count[e]
    (int32 [E]). -> ys [n, D]: each row through its expert's SwiGLU, 0 outside every
    expert's rows."""
    call = jax.ffi.ffi_call(TARGET + variant, jax.ShapeDtypeStruct(xs.shape, jnp.float32))
    return call(xs, start.astype(jnp.int32), count.astype(jnp.int32), packed.w13, packed.w2)


def experts_lora(
    xs: jax.Array,
    start: jax.Array,
    count: jax.Array,
    packed: PackedExpertsLoRA,
    ids: jax.Array,
    *,
    variant: str = "",
) -> jax.Array:
    """`experts` with a bank of adapters: sorted row r also applies adapter ids[r] of its
    expert (-1: none), from `packed.factors`."""
    call = jax.ffi.ffi_call(LORA_TARGET + variant, jax.ShapeDtypeStruct(xs.shape, jnp.float32))
    factors = (f.astype(jnp.float32) for f in packed.factors)
    i32 = (a.astype(jnp.int32) for a in (start, count))
    return call(xs, *i32, packed.w13, packed.w2, ids.astype(jnp.int32), *factors)


def lora_rows(
    x: jax.Array,
    ids: jax.Array,
    a: jax.Array,
    b: jax.Array,
    columns: Sequence[tuple[int, int]] | None = None,
    width: int | None = None,
    *,
    variant: str = "",
) -> jax.Array:
    """x [n, K] float32, each row through adapter ids[r] of a bank (-1: none, zeros) ->
    [n, width]. Segment s of `columns` (default: one, all of b's columns) gets
    (x[r] a[ids[r]][:, s R : (s + 1) R]) b[ids[r]][:, its columns] with a [J, K, S R] and
    b [J, R, M], the segments' columns side by side in b; columns in no segment are 0.
    Each row reads only its own adapter's factors (Punica's BGMV)."""
    columns = ((0, b.shape[-1]),) if columns is None else tuple(columns)
    width = columns[-1][1] if width is None else width
    call = jax.ffi.ffi_call(
        LORA_ROWS_TARGET + variant, jax.ShapeDtypeStruct((x.shape[0], width), jnp.float32)
    )
    bounds = np.array([c for segment in columns for c in segment], np.int64)
    f32 = (t.astype(jnp.float32) for t in (a, b))
    return call(x, ids.astype(jnp.int32), *f32, columns=bounds)


def dense(x: jax.Array, packed: jax.Array, width: int, *, variant: str = "") -> jax.Array:
    """x [n, K] float32 @ w [K, width], from w packed by `pack_dense` -> [n, width]."""
    call = jax.ffi.ffi_call(
        DENSE_TARGET + variant, jax.ShapeDtypeStruct((x.shape[0], width), jnp.float32)
    )
    return call(x, packed)


def attend(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    blocks: jax.Array,
    query_positions: jax.Array,
    key_positions: jax.Array,
    sliding_window: int | None,
    key_scales: jax.Array | None = None,
    value_scales: jax.Array | None = None,
    *,
    variant: str = "",
) -> jax.Array:
    """A decode step's attention: q [B, K, G, H] float32 (scaled) over each row's keys
    and values, blocks [N, K, bs, H] that the row's table [B, M] lists in order of its
    S = M bs slots (contiguous rows: N = B, bs = S, row b's table [b]), at key positions
    [B, S] (-1: empty) up to its query's position [B] (within `sliding_window`) ->
    [B, K, G, H]. With T queries a row (a speculative step's), query_positions is
    [B, T] and heads [t G/T, (t+1) G/T) are query t's: each key is read once for all.
    Keys outside, or in no block (a table entry outside [0, N)), are never read; a row
    with none gets zeros. Keys and values are float32, or int8 read with
    their scales [N, K, bs] (an int8 cache's); any other dtype is made float32 first."""
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    if key_scales is not None:
        call = jax.ffi.ffi_call(ATTEND_INT8_TARGET + variant, out)
        keys, values = (a.astype(jnp.int8) for a in (keys, values))
        scales = (key_scales.astype(jnp.float32), value_scales.astype(jnp.float32))
    else:
        call = jax.ffi.ffi_call(ATTEND_TARGET + variant, out)
        keys, values, scales = keys.astype(jnp.float32), values.astype(jnp.float32), ()
    return call(
        q,
        keys,
        values,
        *scales,
        blocks.astype(jnp.int32),
        key_positions.astype(jnp.int32),
        query_positions.astype(jnp.int32),
        window=sliding_window or 0,
    )


@jax.jit
def pack_dense(w: jax.Array) -> jax.Array:
    """w [K, N] -> [N/P, K, P] float32, N rounded up to whole panels by zeros."""
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, -w.shape[1] % PANEL)))
    return w.reshape(w.shape[0], -1, PANEL).transpose(1, 0, 2)


@jax.jit
def pack(w1: jax.Array, w2: jax.Array, w3: jax.Array, layer: jax.Array) -> PackedExperts:
    """Layer `layer` of the stacked w1/w3 [L, E, D, F] and w2 [L, E, F, D] in the
    kernel's layout, float32 (the slice is read in place: only the copy is written)."""

    def panels(w, pad_x=0):  # [L, E, X, Y] -> [E, Y/P, X + pad_x, P], zero padded
        _, E, X, Y = w.shape
        w = jnp.pad(w[layer].astype(jnp.float32), ((0, 0), (0, pad_x), (0, -Y % PANEL)))
        return w.reshape(E, X + pad_x, -1, PANEL).transpose(0, 2, 1, 3)

    F = w1.shape[-1]
    w13 = jnp.concatenate([panels(w1), panels(w3)], axis=-1)
    return PackedExperts(w13, panels(w2, pad_x=-F % PANEL))


def suits(config: ModelConfig, batch: int) -> bool:
    """Whether a decode step of `batch` rows gives the experts few enough rows each
    (the dense kernel beat XLA's library matmuls at every batch from 1 to 64)."""
    return batch * config.num_experts_per_tok <= MAX_MEAN_ROWS * config.num_experts


def supports(
    config: ModelConfig, w: jax.Array, names=("w1", "w2", "w3"), beside_adapters: bool = False
) -> bool:
    """Whether the kernels compute with these weights as the model would: float32
    activations, float weights (the model casts bfloat16 ones to float32 before its
    matmuls, and the packing does the same, exactly), and for the weights `names`
    no quantization, and no adapters unless their terms are added `beside_adapters` the
    kernel's (the attention projections', by `PackedAttention`; the experts' kernel
    fuses its SwiGLU, and only `PackedExpertsLoRA` applies a bank inside it)."""
    return (
        config.compute_dtype == jnp.float32
        and isinstance(w, jax.Array)
        and jnp.issubdtype(w.dtype, jnp.floating)
        and not any(config.quantized(name) for name in names)
        and (beside_adapters or not any(config.lora(name) for name in names))
    )


def packed_bytes(w1: jax.Array) -> int:
    """The packed copy's size for stacked w1 [L, E, D, F] (and w2, w3 alike)."""
    L, E, D, F = w1.shape
    return 3 * L * E * (-(-D // PANEL) * PANEL) * (-(-F // PANEL) * PANEL) * 4


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable: free memory plus page cache
    it can reclaim, such as a checkpoint just read); None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def packed_experts(
    config: ModelConfig, w1: jax.Array, w2: jax.Array, w3: jax.Array, banked: bool = False
) -> tuple[PackedExperts, ...] | None:
    """Every layer's packed experts from the stacked [L, E, ...] weights (made once),
    if the kernel applies (`supports`; `banked`: with a bank of adapters, which
    `PackedExpertsLoRA` adds), the copy fits and the kernel builds; else None."""
    if not supports(config, w1, beside_adapters=banked):
        return None
    return _packed(
        (w1, w2, w3),
        packed_bytes(w1),
        "the experts",
        lambda: tuple(pack(w1, w2, w3, jnp.int32(i)) for i in range(w1.shape[0])),
    )


def packed_lm_head(config: ModelConfig, w: jax.Array) -> DenseKernel | None:
    """The LM head w [D, V] packed for `dense` (made once), if the kernel applies
    (`supports`), the copy fits and the kernel builds; else None."""
    if not supports(config, w, names=()):
        return None
    return _packed(
        (w,), _dense_bytes(*w.shape), "the LM head", lambda: DenseKernel(pack_dense(w), w.shape[1])
    )


def packed_attention(
    config: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array
) -> tuple[PackedAttention, ...] | None:
    """Every layer's attention projections from the stacked q/k/v [L, D, _, H] and
    o [L, N, H, D] packed for `dense` (made once), if the kernel applies (`supports`),
    the copy fits and the kernel builds; else None."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not supports(config, q, names, beside_adapters=True):  # `PackedAttention.adapters`
        return None
    L, D = q.shape[:2]
    width = qkv_width(q, k, v)
    need = L * (_dense_bytes(D, width) + _dense_bytes(width - 2 * k[0, 0].size, D))
    return _packed(
        (q, k, v, o),
        need,
        "the attention projections",
        lambda: tuple(_pack_attention(q, k, v, o, jnp.int32(i)) for i in range(L)),
    )


def _pack_attention(q, k, v, o, layer) -> PackedAttention:
    qkv, out = _pack_projections(q, k, v, o, layer)
    return PackedAttention(DenseKernel(qkv, qkv_width(q, k, v)), DenseKernel(out, q.shape[1]))


def qkv_width(q: jax.Array, k: jax.Array, v: jax.Array) -> int:
    """(N + 2K) H of stacked q [L, D, N, H], k and v [L, D, K, H]."""
    return sum(w[0, 0].size for w in (q, k, v))


@jax.jit
def _pack_projections(q, k, v, o, layer) -> tuple[jax.Array, jax.Array]:
    D = q.shape[1]
    qkv = jnp.concatenate([w[layer].reshape(D, -1) for w in (q, k, v)], axis=1)
    return pack_dense(qkv), pack_dense(o[layer].reshape(-1, D))


def _dense_bytes(K: int, N: int) -> int:
    return K * (-(-N // PANEL) * PANEL) * 4


def _packed(weights: tuple[jax.Array, ...], need: int, what: str, make):
    """make()'s packed copy of `weights`, made once per set of weights; None where the
    copy would not fit in memory (with a warning) or the kernel does not build."""
    key = tuple(id(w) for w in weights)
    hit = _PACKED.get(key)
    if hit is not None and all(ref() is w for ref, w in zip(hit[0], weights, strict=True)):
        return hit[1]
    free = available_memory()
    if free is not None and need > MAX_FREE_FRACTION * free:
        warnings.warn(
            f"mixtral_jax: no packed copy of {what} for the CPU decode kernels: it would "
            f"take {need / 1e9:.1f} GB of the {free / 1e9:.1f} GB available, so decode "
            "uses XLA's matmuls for them (slower at batch > 1)",
            stacklevel=3,
        )
        return None
    if not available():
        return None
    packed = make()
    refs = tuple(weakref.ref(w, lambda _, key=key: _PACKED.pop(key, None)) for w in weights)
    _PACKED[key] = (refs, packed)
    return packed


# Packed copies by the identity of the weights they came from (JAX arrays are
# immutable, so the same arrays mean the same values); dropped with those arrays.
_PACKED: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], object]] = {}

"""Plans: what a model needs per chip on a TPU slice, told by the TPU compiler itself.

The project's own jitted functions (the prefill and decode steps of
`inference/generate.py`, the serving engine's of `inference/engine.py`, the train
step of `training/steps.py`) are lowered with abstract arrays
(`jax.ShapeDtypeStruct` with shardings: no weights, nothing allocated) and
compiled for the devices of a slice: TPU devices from
`jax.experimental.topologies` when libtpu is installed (`pip install -e
".[tpu]"`), or virtual CPU devices (`cpu:8`). The compiled program's memory
analysis gives the bytes per chip, which decide whether a plan fits.

Costs. XLA's cost analysis counts a loop's body once, and these programs loop
over layers (`scan`), micro-batches and, dropless, pick an expert capacity under
`lax.switch`. FLOPs and bytes per step therefore come from "cost twins": the
same step with 1 and then 2 layers unrolled and the experts at capacity factor
1 (balanced routing), extrapolated to the model's layers and micro-batches.
A decode step reads only the experts its tokens chose, which no static count
sees: it is priced by what it reads (weights, the chosen experts' share, the
cache). The roofline time of a step is max(FLOPs / peak, bytes / bandwidth)
per chip; it ignores communication, whose collectives are listed instead.

Serving holds one cache slot of the whole context per request, and a slot is the
one thing that grows: `largest_batch` starts where the batch of 1's memory and the
slots' cache fill a chip, and, when that is over, compiles where the line through
two compiled peaks meets the memory (a try the compiler refused has no peak to draw
the line through: the search then halves the bracket or follows the plans that fit).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.inference.cache import cache_shardings, empty_cache
from mixtral_jax.inference.engine import (
    PREFILL_CHUNK,
    PREFILL_ROWS,
    jitted_decode,
    prefill_chunks,
)
from mixtral_jax.inference.generate import decode_step, prefill_step
from mixtral_jax.inference.grammar import mask_words
from mixtral_jax.inference.sampling import RowSampling, Sampling
from mixtral_jax.inference.scheduler import Scheduler
from mixtral_jax.model.config import ARCHITECTURE_FIELDS, ModelConfig
from mixtral_jax.model.kv_cache import init_cache
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.parallel.placement import param_shardings, place, shardings_like
from mixtral_jax.parallel.rules import DEFAULT_RULES, Rules, named_sharding, spec_axes
from mixtral_jax.params import flat_params
from mixtral_jax.planning.topology import Chip, PlanError, TpuSlice
from mixtral_jax.training import steps, train

MODES = ("inference", "serve", "lora", "full", "train")
# Training modes whose steps train every weight (full fine-tuning, or training as
# configs/pretrain.py sets it up).
FULL_MODES = ("full", "train")
# Each training mode's config, under configs/.
TRAIN_CONFIGS = {"lora": "finetune_lora.py", "full": "finetune_full.py", "train": "pretrain.py"}
# Memory the TPU runtime and fragmentation take beyond what the program needs.
HEADROOM = 0.05
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled step, per chip."""

    name: str  # "prefill", "decode", "train step"
    tokens: int  # tokens processed per step, over all chips
    arguments: int  # bytes: parameters, state, cache, inputs
    outputs: int
    aliased: int  # outputs written over donated arguments
    temporaries: int
    code: int
    collectives: dict[str, int]  # op -> count in the compiled program
    flops: float | None = None  # per step and chip
    bytes_accessed: float | None = None
    cost_source: str = ""
    exhausted: str = ""  # the TPU compiler's refusal, when it ran out of memory
    model_flops: float | None = None  # per step and chip: the work itself (training_flops)

    @property
    def total(self) -> int:
        """Peak bytes per chip: what the program holds at once."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def seconds(self, chip: Chip) -> float | None:
        """Roofline time of one step on `chip` (compute or memory bound)."""
        if chip.flops is None or self.flops is None:
            return None
        return max(self.flops / chip.flops, self.bytes_accessed / chip.bandwidth)

    def bound(self, chip: Chip) -> str:
        if self.seconds(chip) is None:
            return ""
        return (
            "compute"
            if self.flops / chip.flops >= self.bytes_accessed / chip.bandwidth
            else "memory"
        )

    def mfu(self, chip: Chip) -> float | None:
        """Model FLOPs utilisation at the roofline time: the work itself against the
        chip's peak. Below 1 by what the compiled step does beyond it (dispatch
        einsums, capacity slack, rematerialisation) or a memory-bound step; the
        roofline leaves out communication, so a measured MFU is lower still."""
        seconds = self.seconds(chip)
        if seconds is None or self.model_flops is None:
            return None
        return self.model_flops / seconds / chip.flops


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    mode: str
    slice: TpuSlice
    mesh: dict[str, int]
    batch: int
    seq_len: int
    num_params: int
    param_bytes: int  # per chip
    optimizer_bytes: int  # per chip
    cache_bytes: int  # per chip
    programs: tuple[Program, ...]
    cache: str = ""  # serving: how the KV cache is kept, when not slots of the model's dtype

    @property
    def static_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes + self.cache_bytes

    @property
    def peak(self) -> int:
        """Peak bytes per chip of its programs; uncompiled, what it holds before running."""
        return max((p.total for p in self.programs), default=self.static_bytes)

    @property
    def usable(self) -> int:
        return int(self.slice.chip.hbm * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable and not any(p.exhausted for p in self.programs)

    @property
    def peak_step(self) -> str:
        """The step that needs the most memory."""
        return max(self.programs, key=lambda p: p.total).name if self.programs else ""

    @property
    def mesh_text(self) -> str:
        return mesh_text(self.mesh)


def mesh_text(mesh: Mapping[str, int]) -> str:
    shown = [f"{a}={n}" for a, n in mesh.items() if n > 1]
    return ",".join(shown) or "one device"


def slice_mesh(sizes: Mapping[str, int], slice_: TpuSlice) -> tuple[Mesh, dict[str, int]]:
    """The mesh of `sizes` over the slice's devices; unnamed axes are 1, but `fsdp`
    takes the devices left over unless it is named."""
    sizes = {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1} | dict(sizes)
    try:
        mesh = make_mesh(**sizes, devices=list(slice_.devices))
    except ValueError as error:
        raise PlanError(f"mesh {mesh_text(sizes)} on {slice_.name}: {error}") from error
    except NotImplementedError as error:  # JAX lays a mesh axis out on whole torus axes
        raise PlanError(
            f"mesh {mesh_text(sizes)} cannot be laid out on {slice_.name}'s "
            f"{slice_.topology} torus: each mesh axis must be a product of its axes; "
            "choose other sizes"
        ) from error
    return mesh, dict(mesh.shape)


def bytes_per_chip(tree: Any) -> int:
    """Bytes one device holds of a tree of abstract arrays with shardings (int4:
    half a byte per element, as TPU v4 and later store it)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * element_bits(x.dtype) // 8
        for x in jax.tree.leaves(tree)
    )


def element_bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    return 4 if dtype in (jnp.int4, jnp.uint4) else 8 * dtype.itemsize


def _compile(name: str, tokens: int, lowered, static_bytes: int) -> Program:
    """Compiles one step. The TPU compiler refuses a program that cannot fit its HBM:
    the refusal becomes a program with the temporaries it asked for."""
    try:
        return _program(name, tokens, lowered.compile())
    except jax.errors.JaxRuntimeError as error:
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
    asked = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message) or re.search(
        r"Used ([\d.]+)([KMGT])", message
    )
    temporaries = 0
    if asked:
        temporaries = int(float(asked.group(1)) * 1024 ** "KMGT".index(asked.group(2)) * 1024)
    first = message.splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
    return Program(name, tokens, static_bytes, 0, 0, temporaries, 0, {}, exhausted=first)


def _program(name: str, tokens: int, compiled) -> Program:
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    counts = {op: len(re.findall(rf"\s{op}(?:-start)?\(", text)) for op in COLLECTIVES}
    return Program(
        name,
        tokens,
        memory.argument_size_in_bytes,
        memory.output_size_in_bytes,
        memory.alias_size_in_bytes,
        memory.temp_size_in_bytes,
        memory.generated_code_size_in_bytes,
        {op: n for op, n in counts.items() if n},
    )


def _costs(compiled) -> tuple[float, float]:
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    return float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0))


def _extrapolate(cost_of, num_layers: int) -> tuple[float, float]:
    """Costs at `num_layers` from the twins of 1 and 2 unrolled layers."""
    one, two = cost_of(1), cost_of(2)
    return tuple(a + (num_layers - 1) * (b - a) for a, b in zip(one, two, strict=True))


def abstract_model(config: ModelConfig) -> Mixtral:
    return nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))


def _twin(config: ModelConfig, num_layers: int) -> ModelConfig:
    return config.replace(num_layers=num_layers, scan_layers=False, capacity_factor=1.0)


# ---------------------------------------------------------------------------
# The steps: what they hold before compiling (`static`), and how to compile them.


@dataclasses.dataclass(frozen=True)
class Steps:
    param_bytes: int  # per chip
    optimizer_bytes: int
    cache_bytes: int
    compile: Any  # (costs: bool) -> list[Program]

    @property
    def static_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes + self.cache_bytes


def _inference(config: ModelConfig, mesh: Mesh, rules, batch: int, seq_len: int) -> Steps:
    """The prefill of a `seq_len`-token prompt and a decode step over a cache of
    `seq_len` tokens, as `generate.py` runs them."""
    graphdef, params = _placed(config, mesh, rules)
    cache = jax.eval_shape(functools.partial(init_cache, config, batch, seq_len))
    cache = place(cache, cache_shardings(cache, mesh, rules))
    # Rows split over the batch axes that divide them (a batch of 1 is replicated).
    rows = named_sharding(steps.BATCH_AXES, (batch, seq_len), mesh, rules)
    row = named_sharding(steps.BATCH_AXES[:1], (batch,), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    key = place(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    ints = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    mesh_rules = (mesh, tuple(rules))
    cache_bytes = bytes_per_chip(cache)

    def compile_(costs: bool) -> list[Program]:
        prompt = (ints((batch, seq_len), sharding=rows), ints((batch,), sharding=row))
        held = bytes_per_chip(params) + cache_bytes
        prefill = prefill_step.lower(graphdef, params, *prompt, cache, key, Sampling(), mesh_rules)
        step = (ints((batch,), sharding=row), ints((batch,), sharding=row))
        decode = decode_step.lower(graphdef, params, *step, cache, key, Sampling(), mesh_rules)
        decode_costs = _decode_cost(config, params, batch, seq_len, mesh.size, cache_bytes)
        prefill_costs = costs and (lambda: _forward_costs(config, mesh, rules, prompt[0]))
        return _generation(
            held, prefill, batch * seq_len, decode, batch, decode_costs, prefill_costs
        )

    return Steps(bytes_per_chip(params), 0, cache_bytes, compile_)


def _placed(config: ModelConfig, mesh: Mesh, rules) -> tuple[Any, Any]:
    """The abstract model's graphdef and its parameters in their shardings on `mesh`."""
    model = abstract_model(config)
    graphdef, params = nnx.split(model)
    by_path = param_shardings(model, mesh, rules)
    return graphdef, place(params, shardings_like(params, by_path, mesh))


def _serving(
    config: ModelConfig,
    mesh: Mesh,
    rules,
    batch: int,
    seq_len: int,
    rows: int,
    chunk: int,
    paged: tuple[int, int] | None = None,
    kv_dtype: str | None = None,
) -> Steps:
    """The server's programs (`inference/engine.py`) for `batch` slots of `seq_len`
    tokens, each in its largest form: the largest prefill call of `chunk` tokens over
    up to `rows` prompts (`Scheduler.shapes`) with the prompts' log-probabilities, and
    the decode step over every slot with the drawn tokens'. The prefill's costs are
    those of a forward over the chunks (their attention over the chunks before them is
    not counted). `paged` (blocks, block_size): a pool of that many blocks in place of
    the slots' cache; `kv_dtype`: what the cache stores."""
    graphdef, params = _placed(config, mesh, rules)
    chunk = min(chunk, seq_len)
    shapes = Scheduler(batch, chunk, rows, 1).shapes()
    rows, length = max(shapes, key=lambda shape: (shape[0] * shape[1], shape[0]))
    dtype = None if kv_dtype is None else jnp.dtype(kv_dtype)
    make = functools.partial(empty_cache, config, batch, seq_len, None, rules, dtype, chunk, paged)
    cache = jax.eval_shape(make)
    cache = place(cache, cache_shardings(cache, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())

    def array(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    def sampling(n: int) -> RowSampling:
        floats, ints = array((n,), jnp.float32), array((n,))
        allowed = array((n, mask_words(config.vocab_size)))  # structured output's masks
        return RowSampling(floats, ints, floats, array((n,), jnp.uint32), ints, allowed)

    mesh_rules = (mesh, tuple(rules))
    cache_bytes = bytes_per_chip(cache)

    def compile_(costs: bool) -> list[Program]:
        held = bytes_per_chip(params) + cache_bytes
        R, C = (rows,), (rows, length)
        chunks = (array(R), array(C), array(R), array(R), array(R, jnp.bool_), array(C))
        prefill = prefill_chunks.lower(
            graphdef, params, cache, *chunks, sampling(rows), mesh_rules, True
        )
        slots = (array((batch,)), array((batch,)), array((batch,), jnp.bool_))
        decode = jitted_decode().lower(
            graphdef, params, cache, *slots, sampling(batch), mesh_rules, True, None
        )
        decode_costs = _decode_cost(config, params, batch, seq_len, mesh.size, cache_bytes)
        tokens = jax.ShapeDtypeStruct(
            C, jnp.int32, sharding=named_sharding(steps.BATCH_AXES, C, mesh, rules)
        )
        prefill_costs = costs and (lambda: _forward_costs(config, mesh, rules, tokens))
        return _generation(held, prefill, rows * length, decode, batch, decode_costs, prefill_costs)

    return Steps(bytes_per_chip(params), 0, cache_bytes, compile_)


def _generation(
    held: int, prefill, prefill_tokens: int, decode, batch: int, decode_costs: dict, prefill_costs
) -> list[Program]:
    """The prefill and decode programs, compiled. Decode is priced by what it reads, at
    no compile: always; the prefill by `prefill_costs()` (cost twins) when it is given
    and the prefill compiled."""
    programs = [
        _compile("prefill", prefill_tokens, prefill, held),
        dataclasses.replace(_compile("decode", batch, decode, held), **decode_costs),
    ]
    if prefill_costs and not programs[0].exhausted:
        programs[0] = dataclasses.replace(programs[0], **prefill_costs())
    return programs


def _forward_costs(config: ModelConfig, mesh: Mesh, rules, tokens) -> dict:
    """FLOPs and bytes of a forward pass over `tokens` (abstract), from the cost twins."""

    def cost(num_layers: int) -> tuple[float, float]:
        forward = steps.jit_forward(abstract_model(_twin(config, num_layers)), mesh, rules)
        return _costs(forward.fn.lower(forward.params, tokens, None, None).compile())

    flops, read = _extrapolate(cost, config.num_layers)
    return dict(flops=flops, bytes_accessed=read, cost_source="cost twins")


def _decode_cost(config, params, batch, seq_len, num_chips, cache_bytes) -> dict:
    """What a decode step reads and computes per chip: every weight but the experts',
    the experts its tokens chose (expected share, tokens choosing independently) and
    the whole cache."""
    c = config
    flat = flat_params(params)
    expert_bytes = sum(bytes_per_chip(v) for p, v in flat.items() if "experts" in p)
    other_bytes = sum(bytes_per_chip(v) for p, v in flat.items() if "experts" not in p)
    E, k = c.num_experts, c.num_experts_per_tok
    chosen = 1 - (1 - k / E) ** batch  # expected share of experts that some token chose
    attention = 2 * c.num_layers * seq_len * c.num_heads * c.head_dim  # q.k and p.v
    return {
        "flops": batch * 2 * (active_params(c) + attention) / num_chips,
        "bytes_accessed": other_bytes + chosen * expert_bytes + cache_bytes,
        "cost_source": "weights read",
    }


def active_params(c: ModelConfig) -> int:
    """Parameters one token uses: attention, router, k experts, norms, LM head."""
    D = c.hidden_size
    attention = D * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    experts = c.num_experts_per_tok * 3 * D * c.intermediate_size
    return c.num_layers * (attention + D * c.num_experts + experts + 2 * D) + D * c.vocab_size + D


def forward_flops(c: ModelConfig, rows: int, seq_len: int) -> float:
    """The matmul FLOPs of a forward pass that a perfect sparse model does: the active
    parameters' (k experts per token, the router, the LM head) and causal attention's
    (each query against (T + 1) / 2 keys on average)."""
    D = c.hidden_size
    matmuls = (
        c.num_layers
        * (
            D * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
            + D * c.num_experts
            + c.num_experts_per_tok * 3 * D * c.intermediate_size
        )
        + D * c.vocab_size
    )
    attention = c.num_layers * 2 * c.num_heads * c.head_dim * (seq_len + 1) / 2
    return rows * seq_len * (2 * matmuls + 2 * attention)


def training_flops(c: ModelConfig, rows: int, seq_len: int, lora: bool = False) -> float:
    """The FLOPs a training step must do, as MFU counts them: forward and backward,
    3x `forward_flops`, or 2x for LoRA, whose frozen weights get no gradient (the
    adapters' own work is left out)."""
    return (2 if lora else 3) * forward_flops(c, rows, seq_len)


def train_model_config(config: ModelConfig, train_config) -> ModelConfig:
    """The architecture of `config` with the execution settings of a training config
    (as `train.build_model` does for a checkpoint), LoRA adapters included."""
    overrides = train_config.model.to_dict() if train_config.model is not None else {}
    execution = {k: v for k, v in overrides.items() if k not in ARCHITECTURE_FIELDS}
    config = ModelConfig.from_dict({**config.to_dict(), **execution})
    if train_config.lora.rank:
        config = config.replace(
            lora_rank=train_config.lora.rank,
            lora_alpha=train_config.lora.alpha,
            lora_targets=train.names(train_config.lora.targets),
        )
    return config


def _training(config: ModelConfig, train_config, mesh, rules, batch, seq_len) -> Steps:
    """The train step of `train.py`: its optimizer, trainable filter and accumulation."""
    accumulate = train_config.optimizer.accumulate
    if batch % accumulate:
        raise PlanError(
            f"a batch of {batch} rows does not split into {accumulate} micro-batches "
            "(optimizer.accumulate); use a multiple of it"
        )

    def build(model_config: ModelConfig, rows: int, accumulate: int):
        model = abstract_model(model_config)
        step = steps.jit_train_step(
            model,
            train.make_optimizer(train_config.optimizer, train_config.steps),
            mesh,
            rules,
            trainable=train.trainable_filter(train_config),
            accumulate=accumulate,
        )
        _, trained, _, _ = nnx.split(model, step.trainable, nnx.Param, ...)
        trained = place(trained, step.state_shardings.params)
        state = place(jax.eval_shape(step.init_fn, trained), step.state_shardings)
        array = functools.partial(
            jax.ShapeDtypeStruct, (rows, seq_len), sharding=step.batch_sharding
        )
        data = {
            "tokens": array(jnp.int32),
            "targets": array(jnp.int32),
            "weights": array(jnp.float32),
        }
        return step, state, data

    step, state, data = build(config, batch, accumulate)
    try:
        steps.check_rows(batch, step.batch_sharding, accumulate)
    except ValueError as error:
        raise PlanError(str(error)) from error

    def compile_(costs: bool) -> list[Program]:
        held = bytes_per_chip(state) + bytes_per_chip(step.frozen)
        lowered = step.step_fn.lower(state, step.frozen, data)
        program = _compile("train step", batch * seq_len, lowered, held)
        if not costs or program.exhausted:
            return [program]

        def step_cost(num_layers: int) -> tuple[float, float]:
            twin = _twin(config, num_layers).replace(capacity_factor=config.capacity_factor)
            twin_step, twin_state, twin_data = build(twin, batch // accumulate, 1)
            return _costs(
                twin_step.step_fn.lower(twin_state, twin_step.frozen, twin_data).compile()
            )

        flops, read = _extrapolate(step_cost, config.num_layers)
        work = training_flops(config, batch, seq_len, lora=bool(config.lora_rank))
        return [
            dataclasses.replace(
                program,
                flops=flops * accumulate,
                bytes_accessed=read * accumulate,
                cost_source="cost twins",
                model_flops=work / mesh.size,
            )
        ]

    param_bytes = bytes_per_chip(state.params) + bytes_per_chip(step.frozen)
    return Steps(param_bytes, bytes_per_chip(state.opt_state), 0, compile_)


# ---------------------------------------------------------------------------


def make_plan(
    config: ModelConfig,
    slice_: TpuSlice,
    *,
    mode: str,
    batch: int,
    seq_len: int,
    mesh: Mapping[str, int],
    train_config: ml_collections.ConfigDict | None = None,
    rules: Rules = DEFAULT_RULES,
    costs: bool = True,
    name: str = "model",
    prefill_rows: int = PREFILL_ROWS,
    prefill_chunk: int = PREFILL_CHUNK,
    block_size: int | None = None,
    mean_len: int | None = None,
    kv_dtype: str | None = None,
) -> Plan:
    """Compiles the steps of `mode` for `slice_` and reads what they need per chip.
    Serving (`batch` slots of `seq_len` tokens) prefills up to `prefill_chunk` tokens
    of up to `prefill_rows` prompts per call, as the server's options say; with
    `block_size`, a paged cache of as many blocks as `batch` requests of `mean_len`
    tokens (of up to `seq_len`) fill, in `kv_dtype` (the model's dtype if None).

    When the parameters, optimizer state and cache alone exceed a chip's memory,
    nothing is compiled and the plan has no programs.
    """
    if mode not in MODES:
        raise PlanError(f"unknown mode {mode!r}; the modes are {list(MODES)}")
    if not isinstance(batch, int) or batch < 1 or not isinstance(seq_len, int) or seq_len < 1:
        raise PlanError(f"batch and seq_len must be positive integers, got {batch}, {seq_len}")
    if seq_len > config.max_position_embeddings:
        raise PlanError(
            f"seq_len {seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; plan a shorter context"
        )
    if config.quantization and mode in FULL_MODES:
        raise PlanError(
            f"a {config.quantization} model is frozen: plan --mode lora (QLoRA) or "
            "inference with it, or full fine-tuning without --quantize"
        )
    device_mesh, sizes = slice_mesh(mesh, slice_)
    cache = ""
    if mode in ("inference", "serve"):
        config = config.replace(capacity_factor=None)  # generation is dropless
        if mode == "inference":
            planned = _inference(config, device_mesh, rules, batch, seq_len)
        else:
            paged = None
            if block_size is not None:
                mean_len = min(mean_len or seq_len, seq_len)
                paged = (batch * -(-mean_len // block_size), block_size)
                cache = f"pages of {block_size}, {mean_len:,} tokens a request on average"
            if kv_dtype is not None:
                cache = f"{cache}, {kv_dtype}" if paged else kv_dtype
            planned = _serving(
                config, device_mesh, rules, batch, seq_len, prefill_rows, prefill_chunk,
                paged, kv_dtype,
            )  # fmt: skip
    else:
        if train_config is None or (mode == "lora") != bool(train_config.lora.rank):
            raise PlanError(
                f"mode {mode} needs a training config with "
                f"{'lora.rank > 0' if mode == 'lora' else 'lora.rank = 0'}, such as "
                f"configs/{TRAIN_CONFIGS[mode]}"
            )
        config = train_model_config(config, train_config)
        planned = _training(config, train_config, device_mesh, rules, batch, seq_len)
    usable = int(slice_.chip.hbm * (1 - HEADROOM))
    programs = planned.compile(costs) if planned.static_bytes <= usable else []
    return Plan(
        name,
        mode,
        slice_,
        sizes,
        batch,
        seq_len,
        num_params(config.replace(quantization=None)),
        planned.param_bytes,
        planned.optimizer_bytes,
        planned.cache_bytes,
        tuple(programs),
        cache,
    )


def num_params(config: ModelConfig) -> int:
    model = abstract_model(config)
    return sum(math.prod(v.shape) for v in flat_params(nnx.state(model, nnx.Param)).values())


def candidates(mode: str, config: ModelConfig, num_devices: int) -> list[dict[str, int]]:
    """A few meshes worth trying for `mode` on `num_devices` chips, most likely first."""

    def divisors(limit: int) -> list[int]:
        return [d for d in (16, 8, 4, 2) if d <= limit and num_devices % d == 0]

    if mode in ("inference", "serve"):
        meshes = [{"tensor": t, "fsdp": num_devices // t} for t in divisors(config.num_kv_heads)]
        meshes += [{"fsdp": num_devices}]
        meshes += [{"expert": e, "fsdp": num_devices // e} for e in divisors(config.num_experts)]
    else:
        meshes = [{"fsdp": num_devices}]
        meshes += [{"expert": e, "fsdp": num_devices // e} for e in divisors(config.num_experts)]
        meshes += [{"tensor": t, "fsdp": num_devices // t} for t in divisors(config.num_kv_heads)]
    return [{a: n for a, n in m.items() if n > 1} or {"fsdp": 1} for m in meshes]


def nearest_fit(plan: Plan, config: ModelConfig, *, max_compiles: int = 6, **kwargs) -> Plan | None:
    """For a plan that does not fit: the first candidate that does, or None. Inference
    tries halved batches on its mesh first, then other meshes; fine-tuning the other
    way round (its batch is the optimizer's). Candidates whose parameters, state and
    cache alone exceed the memory are not compiled; at most `max_compiles` are."""
    own = {a: n for a, n in plan.mesh.items() if n > 1}
    meshes = [(m, plan.batch) for m in candidates(plan.mode, config, plan.slice.size) if m != own]
    batches, batch = [], plan.batch // 2
    while batch >= 1:
        batches.append((plan.mesh, batch))
        batch //= 2
    tries = batches + meshes if plan.mode in ("inference", "serve") else meshes + batches
    compiled = 0
    for mesh, batch in tries:
        try:
            other = make_plan(
                config,
                plan.slice,
                mode=plan.mode,
                batch=batch,
                seq_len=plan.seq_len,
                mesh=mesh,
                costs=False,
                name=plan.model,
                **kwargs,
            )
        except (PlanError, ValueError):
            continue  # e.g. a batch that no longer splits over the mesh
        if other.fits:
            return other
        compiled += bool(other.programs)
        if compiled >= max_compiles:
            break
    return None


def _next_try(below: Plan | None, fits: Plan, over: Plan) -> int:
    """The batch where the line through two compiled peaks meets the memory: through
    the largest plan that fits and the smallest that does not, unless the compiler
    refused that one. A refusal's figure is what the compiler asked for when it gave up,
    which can lie far above the line through its neighbours, and a line through it would
    creep up from far below; then the line through the two largest plans that fit, or
    halfway between the bracket's ends while only one plan fits."""
    refused = any(p.exhausted for p in over.programs)
    a, b = (fits, over) if not refused else (below, fits)
    if a is not None and b.peak > a.peak:
        per_slot = (b.peak - a.peak) / (b.batch - a.batch)
        guess = int(fits.batch + (fits.usable - fits.peak) / per_slot)
        if guess < over.batch:
            return guess
    return (fits.batch + over.batch) // 2


def largest_batch(
    config: ModelConfig,
    slice_: TpuSlice,
    *,
    seq_len: int,
    mesh: Mapping[str, int],
    max_compiles: int = 4,
    progress: Callable[[Plan], None] | None = None,
    **kwargs,
) -> Plan | None:
    """Serving: the plan with the most slots of `seq_len` tokens that fits, or None
    when not even one does. Slots are what grows with the batch: the first try is as
    many as the memory that the batch of 1 leaves holds in cache alone, and if that
    fits, no more would. A try that is over brackets the answer with the largest that
    fit, and the next try is where the line through the two peaks meets the memory.
    At most `max_compiles` tries past the batch of 1 (each given to `progress`), so
    a bracket left open gives a lower bound (`_next_try` says where the tries go); the
    batch is a multiple of the mesh axes the cache's slots split over."""

    def plan_at(batch: int) -> Plan:
        tried = make_plan(
            config,
            slice_,
            mode="serve",
            batch=batch,
            seq_len=seq_len,
            mesh=mesh,
            costs=False,
            **kwargs,
        )
        if progress is not None:
            progress(tried)
        return tried

    fits, over = plan_at(1), None  # the largest that fits, the smallest that does not
    if not fits.fits:
        return None
    split = spec_axes(dict(kwargs.get("rules", DEFAULT_RULES)).get("batch"))
    step = math.prod(n for a, n in fits.mesh.items() if a in split)
    below = None  # the largest that fits before `fits`
    batch = (fits.usable - (fits.peak - fits.cache_bytes)) // fits.cache_bytes * step
    for _ in range(max_compiles):
        if batch <= fits.batch or (over is not None and batch >= over.batch):
            break
        tried = plan_at(batch)
        if tried.fits and over is None:
            return tried
        if tried.fits:
            below, fits = fits, tried
        else:
            over = tried
        batch = _next_try(below, fits, over) // step * step
    return fits

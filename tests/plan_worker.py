"""Plans of a tiny model on 8 virtual CPU devices (and a TPU slice when libtpu is
installed); `test_plan.py` starts it in a subprocess, as the device-count flag must
be set before JAX starts.

    python -m tests.plan_worker  ->  one JSON line of results
"""

from __future__ import annotations

import json
import math
import os

from tests import xla_flags  # noqa: E402

if __name__ == "__main__":  # before JAX starts; a module that imports this keeps its devices
    os.environ["XLA_FLAGS"] = xla_flags(8)
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import finetune_tiny, tiny  # noqa: E402
from mixtral_jax.model.config import ModelConfig  # noqa: E402
from mixtral_jax.parallel.placement import logical_axes  # noqa: E402
from mixtral_jax.parallel.rules import MESH_AXES, partition_spec, spec_axes  # noqa: E402
from mixtral_jax.params import flat_params  # noqa: E402
from mixtral_jax.planning.plan import (  # noqa: E402
    HEADROOM,
    _costs,
    _twin,
    abstract_model,
    largest_batch,
    make_plan,
    nearest_fit,
    slice_mesh,
    train_model_config,
    training_flops,
)
from mixtral_jax.planning.report import largest_batch as largest_text  # noqa: E402
from mixtral_jax.planning.report import report, tokens_per_s, verdict  # noqa: E402
from mixtral_jax.planning.topology import GiB, PlanError, get_slice  # noqa: E402

MESH = {"fsdp": 2, "tensor": 2, "expert": 2}


def tiny_config() -> ModelConfig:
    """Four layers, so that the cost twins' extrapolation from 1 and 2 layers is tested."""
    return ModelConfig.from_dict(tiny.get_config()).replace(
        num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256
    )


def expected_param_bytes(config: ModelConfig, sizes: dict[str, int], only=nnx.Param) -> int:
    """Per device, by hand: each dimension split by the mesh axes its rule names."""
    model = abstract_model(config)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1} | sizes
    shape = tuple(sizes[a] for a in MESH_AXES)
    mesh = jax.make_mesh(shape, MESH_AXES, devices=jax.devices()[: math.prod(shape)])
    axes = logical_axes(model)
    total = 0
    for path, value in flat_params(nnx.state(model, only)).items():
        spec = partition_spec(axes[path], value.shape, mesh)
        split = math.prod(sizes[a] for entry in spec for a in spec_axes(entry))
        bits = 4 if value.dtype == jnp.int4 else 8 * jnp.dtype(value.dtype).itemsize
        total += math.prod(value.shape) // split * bits // 8
    return total


def inference(config: ModelConfig) -> dict:
    slice_ = get_slice("cpu:8")
    result = make_plan(config, slice_, mode="inference", batch=8, seq_len=64, mesh=MESH)
    prefill, decode = result.programs
    # The cost twins' extrapolation against the cost of the whole model unrolled.
    unrolled = abstract_model(_twin(config, config.num_layers))
    mesh, _ = slice_mesh(MESH, slice_)
    from mixtral_jax.training import steps

    forward = steps.jit_forward(unrolled, mesh)
    tokens = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=forward.batch_sharding)
    flops, _ = _costs(forward.fn.lower(forward.params, tokens, None, None).compile())
    return {
        "param_bytes": result.param_bytes,
        "expected_param_bytes": expected_param_bytes(config, MESH),
        "cache_bytes": result.cache_bytes,
        # [L, B, K, S, H] keys and values split by batch (fsdp x expert) and KV heads
        # (tensor), float32; slot positions [B, S] int32 split by batch.
        "expected_cache_bytes": 2 * 4 * (8 // 4) * 64 * (2 // 2) * 16 * 4 + (8 // 4) * 64 * 4,
        "prefill_arguments": prefill.arguments,
        "decode_arguments": decode.arguments,
        "prefill_flops": prefill.flops,
        "unrolled_flops": flops,
        "decode_tokens": decode.tokens,
        "num_params": result.num_params,
        "fits": result.fits,
        "report": report(result),
        "collectives": prefill.collectives,
    }


def quantized(config: ModelConfig) -> dict:
    """int4 inference: the weights' bytes are half a byte per integer plus the scales."""
    import importlib.util

    if importlib.util.find_spec("qwix") is None:
        return {"skipped": "qwix is not installed (it needs Python 3.11+)"}
    config = config.replace(quantization="int4", quant_group_size=8)
    slice_ = get_slice("cpu:8")
    result = make_plan(
        config, slice_, mode="inference", batch=8, seq_len=64, mesh=MESH, costs=False
    )
    return {
        "param_bytes": result.param_bytes,
        "expected_param_bytes": expected_param_bytes(config, MESH),
        "float_param_bytes": expected_param_bytes(config.replace(quantization=None), MESH),
        "num_params": result.num_params,
        "fits": result.fits,
    }


def lora(config: ModelConfig) -> dict:
    train_config = finetune_tiny.get_config()
    train_config.lora.rank = 4
    slice_ = get_slice("cpu:8")
    result = make_plan(
        config,
        slice_,
        mode="lora",
        batch=8,
        seq_len=32,
        mesh={"fsdp": 8},
        train_config=train_config,
        costs=False,
    )
    from mixtral_jax.model.layers import LoRAParam

    adapted = train_model_config(config, train_config)
    return {
        "optimizer_bytes": result.optimizer_bytes,
        "adapter_bytes": expected_param_bytes(adapted, {"fsdp": 8}, LoRAParam),
        "param_bytes": result.param_bytes,
        "expected_param_bytes": expected_param_bytes(adapted, {"fsdp": 8}),
        "fits": result.fits,
        "program": result.programs[0].name,
    }


def too_small(config: ModelConfig) -> dict:
    """Full fine-tuning on a chip with room for the model and its AdamW state split by
    fsdp=8 but not replicated over data=8: the search finds the FSDP mesh. A chip too
    small for the weights gets no compile and no alternative. (Training, as it compiles
    one program per plan where inference compiles two.)"""
    kwargs = dict(
        mode="full", batch=8, seq_len=32, costs=False, train_config=finetune_tiny.get_config()
    )
    split = {"fsdp": 8}
    room = make_plan(config, get_slice("cpu:8"), mesh=split, **kwargs).peak
    small_chip = get_slice("cpu:8", hbm_gib=room / (1 - HEADROOM) * 1.001 / GiB)
    squeezed = make_plan(config, small_chip, mesh={"data": 8}, **kwargs)
    nearest = nearest_fit(squeezed, config, train_config=kwargs["train_config"])
    hopeless = make_plan(config, get_slice("cpu:8", hbm_gib=1e-6), mesh=split, **kwargs)
    return {
        "squeezed_fits": squeezed.fits,
        "squeezed_programs": len(squeezed.programs),
        "nearest_mesh": None if nearest is None else nearest.mesh_text,
        "nearest_batch": None if nearest is None else nearest.batch,
        "nearest_fits": None if nearest is None else nearest.fits,
        "nearest_peak": None if nearest is None else nearest.peak,
        "usable": squeezed.usable,
        "verdict": verdict(squeezed, nearest, True),
        "hopeless_fits": hopeless.fits,
        "hopeless_programs": len(hopeless.programs),
        "hopeless_nearest": nearest_fit(hopeless, config, train_config=kwargs["train_config"])
        is not None,
        "hopeless_verdict": verdict(hopeless, None, True),
    }


def serving(config: ModelConfig) -> dict:
    """The server's programs for 8 slots of 64 tokens, and the most slots that fit on a
    chip with room for about twice what one slot's plan needs."""
    mesh = {"tensor": 2, "data": 4}
    kwargs = dict(mode="serve", seq_len=64, mesh=mesh, costs=False, prefill_rows=2)
    result = make_plan(config, get_slice("cpu:8"), batch=8, prefill_chunk=32, **kwargs)
    one = make_plan(config, get_slice("cpu:8"), batch=1, **kwargs)
    chip = get_slice("cpu:8", hbm_gib=2 * one.peak / (1 - HEADROOM) / GiB)
    largest = largest_batch(config, chip, seq_len=64, mesh=mesh, prefill_rows=2)
    more = make_plan(config, chip, batch=largest.batch + 4, **kwargs)
    paged = make_plan(
        config, get_slice("cpu:8"), batch=8, prefill_chunk=32, block_size=16, mean_len=24,
        kv_dtype="int8", **kwargs,
    )  # fmt: skip
    c, blocks = config, 8 * 2  # 8 requests of 24 tokens on average: 2 blocks of 16 each
    # The pool [L, N, K, 16, H] int8 and its scales [L, N, K, 16] float32, split by KV
    # head (tensor) alone; the block tables [8, 64 / 16] and positions [8, 64] int32 by
    # slot (data).
    per_block = c.num_layers * (c.num_kv_heads // 2) * 16 * (c.head_dim + 4)
    tables = (8 // 4) * (64 // 16) * 4 + (8 // 4) * 64 * 4
    return {
        "paged": {
            "programs": {p.name: p.tokens for p in paged.programs},
            "fits": paged.fits,
            "cache": paged.cache,
            "cache_bytes": paged.cache_bytes,
            "expected_cache_bytes": 2 * blocks * per_block + tables,
        },
        "programs": {p.name: p.tokens for p in result.programs},
        "cache_bytes": result.cache_bytes,
        # [L, B, K, S, H] keys and values split by slot (data) and KV head (tensor),
        # float32; slot positions [B, S] int32 split by slot.
        "expected_cache_bytes": 2 * 4 * (8 // 4) * (2 // 2) * 64 * 16 * 4 + (8 // 4) * 64 * 4,
        "fits": result.fits,
        "largest_batch": largest.batch,
        "largest_fits": largest.fits,
        "largest_peak": largest.peak,
        "usable": largest.usable,
        "more_fits": more.fits,
        "text": largest_text(largest, result),
        "none_text": largest_text(None, result),
    }


def tpu(config: ModelConfig) -> dict:
    """The same plan for a v5e-4 slice, compiled by the TPU compiler (needs libtpu)."""
    try:
        slice_ = get_slice("v5e-4")
    except PlanError as error:
        return {"skipped": str(error)}
    config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    result = make_plan(
        config, slice_, mode="inference", batch=8, seq_len=64, mesh={"tensor": 2, "fsdp": 2}
    )
    return {
        "devices": [d.platform for d in slice_.devices],
        "kind": slice_.devices[0].device_kind,
        "param_bytes": result.param_bytes,
        "expected_param_bytes": expected_param_bytes(config, {"fsdp": 2, "tensor": 2}),
        "prefill_arguments": result.programs[0].arguments,
        "prefill_flops": result.programs[0].flops,
        "tokens_per_s": tokens_per_s(result.programs[1], slice_.chip),
    }


def tpu_train(config: ModelConfig) -> dict:
    """Full fine-tuning on a v5e-4, priced by the TPU compiler: the roofline MFU."""
    try:
        slice_ = get_slice("v5e-4")
    except PlanError as error:
        return {"skipped": str(error)}
    config = config.replace(dtype="bfloat16")
    result = make_plan(
        config,
        slice_,
        mode="full",
        batch=8,
        seq_len=64,
        mesh={"fsdp": 4},
        train_config=finetune_tiny.get_config(),
    )
    step = result.programs[0]
    return {
        "model_flops": step.model_flops,
        "expected_model_flops": training_flops(config, 8, 64) / 4,
        "flops": step.flops,
        "mfu": step.mfu(slice_.chip),
        "report": report(result),
    }


if __name__ == "__main__":
    config = tiny_config()
    print(
        json.dumps(
            {
                "inference": inference(config),
                "quantized": quantized(config),
                "lora": lora(config),
                "too_small": too_small(config),
                "serving": serving(config),
                "tpu_train": tpu_train(config),
                "tpu": tpu(config),
            }
        )
    )

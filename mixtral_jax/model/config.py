"""The model configuration: one frozen dataclass, validated when it is built.

Hyperparameters live in `configs/*.py` as ml-collections ConfigDicts; this file
only defines which fields exist, checks that a set of values describes a
model that can be built, and translates from the Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

# remat_policy -> what jax.checkpoint saves of a block for the backward pass (None:
# nothing, the whole block is recomputed); "none" is no rematerialisation at all.
REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The SMoE dispatches (moe.py; docs/moe.md says when each wins).
MOE_IMPLS = ("dense", "sorted")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
DTYPES = ("float32", "bfloat16", "float16")
# Weight-only quantization of the projections and experts (quantized.py): int8 with
# one scale per output channel, int4 with one per group of inputs.
QUANTIZATIONS = ("int8", "int4")
# The sizes of the weights, each a positive integer.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
)
# The fields that describe the weights (a checkpoint fixes them); the others say how
# to run the model and may change from one run to the next.
ARCHITECTURE_FIELDS = (*SIZE_FIELDS, "rope_theta", "rms_norm_eps", "sliding_window")


class ConfigError(ValueError):
    """A configuration value that cannot describe a Mixtral model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and execution settings of a Mixtral model.

    The letters in brackets are the einsum letters used for each size.
    """

    vocab_size: int  # [V]
    hidden_size: int  # [D]
    intermediate_size: int  # [F] hidden size of each SwiGLU expert
    num_layers: int  # [L]
    num_heads: int  # [N]
    num_kv_heads: int  # [K]
    head_dim: int  # [H]
    num_experts: int  # [E]
    num_experts_per_tok: int  # k of top-k
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    sliding_window: int | None = None
    # SMoE dispatch (moe.py): "dense" GShard einsums, tokens routed in groups of
    # `group_size` [S], each expert taking at most C = ceil(k * S / E * capacity_factor)
    # per group; capacity_factor=None means dropless: exact, never a dropped token.
    # "sorted": always dropless, tokens sorted by expert, work independent of balance.
    moe_impl: str = "dense"
    capacity_factor: float | None = None
    group_size: int = 1024
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    initializer_range: float = 0.02
    dtype: str = "float32"  # activations and matmul inputs
    param_dtype: str = "float32"  # stored weights
    scan_layers: bool = True
    remat_policy: str = "none"
    # LoRA adapters (layers.Adapter) on the named weights, rank 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    # Serving many adapters at once (layers.Adapter): each adapted weight holds a bank of
    # this many adapters side by side, each with its alpha / r folded into its B, and every
    # token applies its own (its row's). 0: one adapter per weight, scaled by
    # lora_alpha / lora_rank.
    lora_bank: int = 0
    # Weight-only quantization of LORA_TARGETS' weights (quantized.py): None, "int8" or
    # "int4"; int4 takes one scale per `quant_group_size` consecutive inputs.
    quantization: str | None = None
    quant_group_size: int = 128

    def __post_init__(self):
        if isinstance(self.lora_targets, (list, str)):  # from JSON or a command line
            targets = self.lora_targets
            targets = targets.split(",") if isinstance(targets, str) else targets
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in targets if t))
        _validate(self)

    def quantized(self, name: str) -> bool:
        """Whether weight `name` (e.g. "q_proj", "w1") is stored quantized."""
        return self.quantization is not None and name in LORA_TARGETS

    def lora(self, name: str) -> bool:
        """Whether weight `name` (e.g. "q_proj", "w1") has a LoRA adapter."""
        return self.lora_rank > 0 and name in self.lora_targets

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a dict or ConfigDict, naming any unknown or missing field."""
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        values = dict(values)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, fields, n=1)
                hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(f"unknown model config field(s): {', '.join(hints)}")
        if values.get("head_dim") is None and "num_heads" in values and "hidden_size" in values:
            heads, hidden = values["num_heads"], values["hidden_size"]
            if isinstance(heads, int) and heads > 0 and hidden % heads:
                raise ConfigError(
                    f"config.num_heads={heads} does not divide config.hidden_size={hidden}; "
                    "set config.head_dim explicitly or choose a num_heads that divides hidden_size"
                )
            values["head_dim"] = hidden // heads if isinstance(heads, int) and heads > 0 else 0
        required = [
            n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values
        ]
        if required:
            raise ConfigError(f"model config is missing required field(s): {', '.join(required)}")
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Translates a Hugging Face Mixtral `config.json` (as a dict)."""
        model_type = hf.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ConfigError(f"config.json has model_type={model_type!r}; expected 'mixtral'")
        rope = hf.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(
                f"config.json asks for rope_type={rope['rope_type']!r}; only the default RoPE "
                "of Mixtral is implemented"
            )
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("config.json sets tie_word_embeddings=true; Mixtral's are untied")
        heads = hf["num_attention_heads"]
        values = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            num_experts=hf["num_local_experts"],
            num_experts_per_tok=hf["num_experts_per_tok"],
            rope_theta=float(rope_theta),
            rms_norm_eps=hf["rms_norm_eps"],
            max_position_embeddings=hf["max_position_embeddings"],
            sliding_window=hf.get("sliding_window"),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
            initializer_range=hf.get("initializer_range", 0.02),
        )
        values.update(overrides)
        return cls.from_dict(values)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` fields that describe this architecture."""
        return dict(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            sliding_window=self.sliding_window,
            router_aux_loss_coef=self.router_aux_loss_coef,
            initializer_range=self.initializer_range,
            hidden_act="silu",
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )


def _validate(c: ModelConfig) -> None:
    def positive_int(name: str) -> None:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")

    for name in (*SIZE_FIELDS, "max_position_embeddings", "group_size"):
        positive_int(name)
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(
            f"config.num_kv_heads={c.num_kv_heads} does not divide config.num_heads={c.num_heads}; "
            "grouped-query attention needs every KV head to serve the same number of query heads"
        )
    if c.head_dim % 2:
        raise ConfigError(
            f"config.head_dim={c.head_dim} is odd; rotary embeddings rotate pairs of dimensions"
        )
    if c.num_experts_per_tok > c.num_experts:
        raise ConfigError(
            f"config.num_experts_per_tok={c.num_experts_per_tok} exceeds "
            f"config.num_experts={c.num_experts}; a token cannot choose more experts than exist"
        )
    if c.capacity_factor is not None and not (
        isinstance(c.capacity_factor, (int, float)) and c.capacity_factor > 0
    ):
        raise ConfigError(
            f"config.capacity_factor must be a positive number or None (dropless), "
            f"got {c.capacity_factor!r}"
        )
    if c.moe_impl not in MOE_IMPLS:
        raise ConfigError(f"config.moe_impl={c.moe_impl!r}; choose one of {MOE_IMPLS}")
    if c.moe_impl != "dense" and c.capacity_factor is not None:
        raise ConfigError(
            f"config.capacity_factor={c.capacity_factor} needs config.moe_impl='dense'; "
            f"the {c.moe_impl} dispatch is always dropless (set capacity_factor=None)"
        )
    if c.sliding_window is not None and (
        not isinstance(c.sliding_window, int) or c.sliding_window <= 0
    ):
        raise ConfigError(
            f"config.sliding_window must be a positive integer or None, got {c.sliding_window!r}"
        )
    for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"config.{name} must be a positive number, got {value!r}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"config.{name} must be a number >= 0, got {value!r}")
    for name in ("dtype", "param_dtype"):
        if getattr(c, name) not in DTYPES:
            raise ConfigError(f"config.{name}={getattr(c, name)!r}; choose one of {DTYPES}")
    if c.remat_policy not in ("none", *REMAT_POLICIES):
        raise ConfigError(
            f"config.remat_policy={c.remat_policy!r}; choose one of {('none', *REMAT_POLICIES)}"
        )
    if not isinstance(c.lora_rank, int) or isinstance(c.lora_rank, bool) or c.lora_rank < 0:
        raise ConfigError(f"config.lora_rank must be an integer >= 0, got {c.lora_rank!r}")
    unknown = [t for t in c.lora_targets if t not in LORA_TARGETS]
    if unknown:
        raise ConfigError(f"config.lora_targets has {unknown}; choose among {LORA_TARGETS}")
    if c.lora_rank and not c.lora_targets:
        raise ConfigError(
            f"config.lora_rank={c.lora_rank} but config.lora_targets is empty; name the "
            f"weights to adapt among {LORA_TARGETS}"
        )
    if not isinstance(c.lora_bank, int) or isinstance(c.lora_bank, bool) or c.lora_bank < 0:
        raise ConfigError(f"config.lora_bank must be an integer >= 0, got {c.lora_bank!r}")
    if c.lora_bank and not c.lora_rank:
        raise ConfigError(f"config.lora_bank={c.lora_bank} needs adapters: set lora_rank")
    _validate_quantization(c)
    if not isinstance(c.lora_alpha, (int, float)) or c.lora_alpha <= 0:
        raise ConfigError(f"config.lora_alpha must be a positive number, got {c.lora_alpha!r}")


def load_config_file(path: str | Path, argument: str | None = None) -> Any:
    """The ConfigDict of a `configs/*.py` file: its `get_config()` (or
    `get_config(argument)`, e.g. a mesh recipe's name)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"config file {path} not found; give a configs/*.py file")
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(); a config file defines one")
    return module.get_config() if argument is None else module.get_config(argument)


def _validate_quantization(c: ModelConfig) -> None:
    if c.quantization is not None and c.quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"config.quantization={c.quantization!r}: choose one of {', '.join(QUANTIZATIONS)}, "
            "or None for float weights"
        )
    if c.quantization is not None and importlib.util.find_spec("qwix") is None:
        raise ConfigError(
            f"config.quantization={c.quantization!r} needs qwix (pip install qwix), which "
            "needs Python 3.11 or newer"
        )
    g = c.quant_group_size
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise ConfigError(f"config.quant_group_size must be a positive integer, got {g!r}")
    if c.quantization != "int4":
        return
    # int4 groups run along each weight's last input axis (quantized.py).
    inputs = {
        "hidden_size": c.hidden_size,  # q/k/v_proj, w1, w3
        "head_dim": c.head_dim,  # o_proj, per head
        "intermediate_size": c.intermediate_size,  # w2
    }
    odd = [f"{name}={size}" for name, size in inputs.items() if size % 2]
    if odd:
        raise ConfigError(f"int4 stores two values per byte and needs even sizes; {odd} are odd")
    bad = [f"{name}={size}" for name, size in inputs.items() if size % g]
    if bad:
        common = math.gcd(*inputs.values())
        fits = [d for d in range(min(common, 256), 0, -1) if common % d == 0][:3]
        raise ConfigError(
            f"int4 group size {g} does not divide {', '.join(bad)}: every group must lie "
            "within one weight's input axis; choose a group size that divides hidden_size, "
            f"head_dim and intermediate_size, for this model e.g. "
            f"{', '.join(map(str, fits[:-1]))}{' or ' if len(fits) > 1 else ''}{fits[-1]}"
        )

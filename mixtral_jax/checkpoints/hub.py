"""The one mapping between Hugging Face Mixtral tensors and this model's parameters.

Conversion, export and the tests all go through `RULES`, one tensor at a time,
so a streaming converter never needs more than the tensor in hand.

Hub layout (what `save_pretrained` writes), linear weights stored [out, in]:
  model.embed_tokens.weight                              [V, D]
  model.layers.N.self_attn.{q,k,v,o}_proj.weight         [N*H | K*H, D], o: [D, N*H]
  model.layers.N.block_sparse_moe.gate.weight            [E, D]
  model.layers.N.block_sparse_moe.experts.M.{w1,w3}.weight  [F, D], w2: [D, F]
  model.layers.N.{input,post_attention}_layernorm.weight [D]
  model.norm.weight [D], lm_head.weight [V, D]
transformers 5 keeps the experts fused in memory (its `state_dict()`):
  model.layers.N.mlp.gate.weight [E, D]
  model.layers.N.mlp.experts.gate_up_proj [E, 2F, D] (gate rows, then up rows)
  model.layers.N.mlp.experts.down_proj    [E, D, F]
Both are accepted; export writes the Hub layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from mixtral_jax.model.config import ModelConfig
from mixtral_jax.model.mixtral import Mixtral, param_shapes
from mixtral_jax.params import Path, set_params


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Hub tensor <-> one slice of a parameter.

    `in_dims` is None for tensors copied as they are (embeddings, norms), else
    the number of leading axes of our slice that form the linear layer's input:
    hub weight [out, in] == ours.reshape(prod(in), prod(out)).T
    """

    hub_key: str  # template with {layer} and {expert}
    path: Path
    in_dims: int | None

    @property
    def pattern(self) -> re.Pattern:
        regex = re.escape(self.hub_key).replace(r"\{layer\}", r"(?P<layer>\d+)")
        return re.compile("^" + regex.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")


_LAYER = "model.layers.{layer}."
_MOE = _LAYER + "block_sparse_moe."
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding"), None),
    Rule("model.norm.weight", ("final_norm", "scale"), None),
    Rule("lm_head.weight", ("lm_head",), 1),
    Rule(_LAYER + "input_layernorm.weight", ("layers", "attn_norm", "scale"), None),
    Rule(_LAYER + "post_attention_layernorm.weight", ("layers", "moe_norm", "scale"), None),
    Rule(_LAYER + "self_attn.q_proj.weight", ("layers", "attention", "q_proj"), 1),
    Rule(_LAYER + "self_attn.k_proj.weight", ("layers", "attention", "k_proj"), 1),
    Rule(_LAYER + "self_attn.v_proj.weight", ("layers", "attention", "v_proj"), 1),
    Rule(_LAYER + "self_attn.o_proj.weight", ("layers", "attention", "o_proj"), 2),
    Rule(_MOE + "gate.weight", ("layers", "moe", "gate"), 1),
    Rule(_MOE + "experts.{expert}.w1.weight", ("layers", "moe", "experts", "w1"), 1),
    Rule(_MOE + "experts.{expert}.w2.weight", ("layers", "moe", "experts", "w2"), 1),
    Rule(_MOE + "experts.{expert}.w3.weight", ("layers", "moe", "experts", "w3"), 1),
)
# transformers 5 in-memory names (read only).
_FUSED_GATE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.gate\.weight$")
_FUSED_GATE_UP = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.down_proj$")
# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


class WeightError(ValueError):
    """A checkpoint tensor that does not fit the model (unknown, missing or misshapen)."""


@dataclasses.dataclass(frozen=True)
class ParamSlice:
    """A piece of one parameter: param[index] = value (index = (layer,) or (layer, expert))."""

    path: Path
    index: tuple[int, ...]
    value: np.ndarray


def as_numpy(tensor: Any) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor, bit-exact (bf16 via its bits)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if type(tensor).__module__.startswith("torch"):
        import torch

        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    return np.asarray(tensor)


def _slice_shape(rule: Rule, index: tuple[int, ...], shapes: Mapping[Path, tuple[int, ...]]):
    return shapes[rule.path][len(index) :]


def _hub_shape(rule: Rule, slice_shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.in_dims is None:
        return slice_shape
    return (math.prod(slice_shape[rule.in_dims :]), math.prod(slice_shape[: rule.in_dims]))


def _check_index(key: str, index: tuple[int, ...], config: ModelConfig) -> None:
    limits = (config.num_layers, config.num_experts)
    for value, limit, what in zip(index, limits, ("layer", "expert"), strict=False):
        if value >= limit:
            raise WeightError(
                f"{key}: {what} {value} does not exist in a model with {limit} {what}s; "
                "does the config match the checkpoint?"
            )


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise WeightError(
            f"{key}: shape {tuple(got)} does not match the config, which implies {tuple(want)}"
        )


def hub_to_slices(
    key: str, tensor: Any, config: ModelConfig, shapes: Mapping[Path, tuple[int, ...]]
) -> list[ParamSlice]:
    """The parameter slices one checkpoint tensor fills (empty for ignored buffers)."""
    if _IGNORED.match(key):
        return []
    for rule in RULES:
        m = rule.pattern.match(key)
        if m:
            index = tuple(int(m[g]) for g in ("layer", "expert") if g in m.groupdict())
            _check_index(key, index, config)
            want = _slice_shape(rule, index, shapes)
            array = as_numpy(tensor)
            _check_shape(key, array.shape, _hub_shape(rule, want))
            if rule.in_dims is not None:
                array = array.T
            return [ParamSlice(rule.path, index, array.reshape(want))]
    for pattern, fused in (
        (_FUSED_GATE, "gate"),
        (_FUSED_GATE_UP, "gate_up"),
        (_FUSED_DOWN, "down"),
    ):
        m = pattern.match(key)
        if m:
            return _fused_to_slices(key, fused, int(m["layer"]), as_numpy(tensor), config)
    raise WeightError(
        f"unexpected tensor {key!r}: not part of a Mixtral checkpoint in the Hub layout "
        "(model.layers.N.block_sparse_moe.experts.M.w1.weight ...) or transformers' fused layout"
    )


def _fused_to_slices(
    key: str, kind: str, layer: int, array: np.ndarray, config: ModelConfig
) -> list[ParamSlice]:
    _check_index(key, (layer,), config)
    E, D, F = config.num_experts, config.hidden_size, config.intermediate_size
    if kind == "gate":
        _check_shape(key, array.shape, (E, D))
        return [ParamSlice(("layers", "moe", "gate"), (layer,), array.T)]
    if kind == "gate_up":
        _check_shape(key, array.shape, (E, 2 * F, D))
        w1 = array[:, :F, :].transpose(0, 2, 1)  # [E, D, F]
        w3 = array[:, F:, :].transpose(0, 2, 1)
        return [
            ParamSlice(("layers", "moe", "experts", "w1"), (layer,), w1),
            ParamSlice(("layers", "moe", "experts", "w3"), (layer,), w3),
        ]
    _check_shape(key, array.shape, (E, D, F))
    return [ParamSlice(("layers", "moe", "experts", "w2"), (layer,), array.transpose(0, 2, 1))]


def hub_keys(config: ModelConfig) -> Iterator[tuple[str, Rule, tuple[int, ...]]]:
    """Every Hub-layout key of a model with this config, with its rule and index."""
    for rule in RULES:
        layers = range(config.num_layers) if "{layer}" in rule.hub_key else [None]
        experts = range(config.num_experts) if "{expert}" in rule.hub_key else [None]
        for layer in layers:
            for expert in experts:
                index = tuple(i for i in (layer, expert) if i is not None)
                yield rule.hub_key.format(layer=layer, expert=expert), rule, index


class Coverage:
    """Which parameter units (param, layer[, expert]) the tensors seen so far filled.

    Every unit must come exactly once: `add` refuses a duplicate and `check`
    names the Hub keys of whatever is still missing.
    """

    def __init__(self, config: ModelConfig, shapes: Mapping[Path, tuple[int, ...]]):
        self.config, self.shapes = config, shapes
        self.seen: dict[tuple[Path, tuple[int, ...]], str] = {}

    def add(self, key: str, s: ParamSlice) -> None:
        for unit in _unit_indices(s, self.shapes):
            if unit in self.seen:
                raise WeightError(
                    f"{key}: the same weights were already given by {self.seen[unit]}"
                )
            self.seen[unit] = key

    def check(self) -> None:
        missing = [
            key
            for key, rule, index in hub_keys(self.config)
            if not all(
                u in self.seen
                for u in _unit_indices(ParamSlice(rule.path, index, None), self.shapes)
            )
        ]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise WeightError(
                f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}{more}"
            )


def params_from_hub(
    tensors: Iterable[tuple[str, Any]], config: ModelConfig, dtype: Any = np.float32
) -> dict[Path, np.ndarray]:
    """Assembles full parameter arrays from (key, tensor) pairs, checking coverage.

    Every parameter element must be written exactly once: a missing or a
    duplicated tensor is an error naming the key.
    """
    shapes = param_shapes(config)
    params = {path: np.zeros(shape, dtype) for path, shape in shapes.items()}
    coverage = Coverage(config, shapes)
    for key, tensor in tensors:
        for s in hub_to_slices(key, tensor, config, shapes):
            coverage.add(key, s)
            params[s.path][s.index] = s.value.astype(dtype)
    coverage.check()
    return params


def is_expert(path: Path) -> bool:
    """Parameters stacked [L, E, ...]: one slice per (layer, expert)."""
    return path[:3] == ("layers", "moe", "experts")


def _unit_indices(s: ParamSlice, shapes: Mapping[Path, tuple[int, ...]]):
    """The (path, layer[, expert]) units a slice covers: fused tensors cover all experts."""
    depth = 2 if is_expert(s.path) else (1 if s.path[0] == "layers" else 0)
    if len(s.index) == depth:
        return [(s.path, s.index)]
    extra = shapes[s.path][len(s.index) : depth]
    return [(s.path, s.index + rest) for rest in np.ndindex(*extra)]


def slice_to_hub(rule: Rule, value: np.ndarray) -> np.ndarray:
    """One parameter slice in the Hub's layout (the inverse of `hub_to_slices`)."""
    value = np.asarray(value)
    if rule.in_dims is not None:
        value = value.reshape(_hub_shape(rule, value.shape)[::-1]).T
    return np.ascontiguousarray(value)


def params_to_hub(
    params: Mapping[Path, np.ndarray], config: ModelConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """Hub-layout (key, tensor) pairs from full parameter arrays, in Hub key order."""
    for key, rule, index in hub_keys(config):
        yield key, slice_to_hub(rule, params[rule.path][index])


def load_hub_weights(model: nnx.Module, tensors: Iterable[tuple[str, Any]]) -> None:
    """Replaces a model's parameters with the checkpoint's (cast to the config's param dtype)."""
    config: ModelConfig = model.config
    params = params_from_hub(tensors, config)
    set_params(model, {p: jax.numpy.asarray(v, config.weight_dtype) for p, v in params.items()})


def from_hub_state_dict(state_dict: Mapping[str, Any], config: ModelConfig) -> Mixtral:
    """A model holding the weights of a transformers `MixtralForCausalLM` state dict."""
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    load_hub_weights(model, state_dict.items())
    return model

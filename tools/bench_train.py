"""The training section of tools/bench.py: a fine-tuning step, ours beside transformers'
and peft's, from the same weights and the same batch.

    python tools/bench.py --sections train --train_seq_lens 1024,2048

Full fine-tuning (AdamW, float32 master weights; float32 compute on a CPU, the
model's `dtype` elsewhere), the router's load-balancing loss on:
  - ours with each SMoE dispatch training can use: the sorted one (dropless, as
    transformers is), the dense one at capacity factors 1.0 and 1.25 (overflowing
    choices dropped; the fraction is printed) and dropless (the smallest capacity
    that holds the fullest expert), and the sorted one with every block
    rematerialised (`remat_policy="full"`, gradient checkpointing);
  - transformers' `MixtralForCausalLM` (forward with `labels` and
    `output_router_logits=True`, backward, `torch.optim.AdamW`), eager, as its
    users train it, without and with gradient checkpointing.
LoRA (rank 16 on q, k, v, o and the experts' w1, w2, w3): ours (dense dispatch), and peft's
`LoraConfig` on the same modules (the experts through `target_parameters`; peft
gives w1 and w3 one adapter on their fused `gate_up_proj`, ours one each).

Before timing, each pair computes the same loss from the same weights (the figure
is printed; tests/test_bench_train.py checks losses and gradients on a tiny model).
The contenders run in alternation (`interleaved`); our variants pass one training
state from step to step, so the weights they train are shared, not copied.
MFU counts the active FLOPs a perfect sparse model needs: 3x a forward pass for a
full step (forward, input and weight gradients), 2x for LoRA (the frozen weights
get no gradient), against the matmul peak measured at the start of the run.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mixtral_jax import Mixtral, ModelConfig
from mixtral_jax.checkpoints import hub
from mixtral_jax.model.layers import LoRAParam
from mixtral_jax.model.mixtral import with_config
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.params import Path, set_params
from mixtral_jax.planning.plan import training_flops
from mixtral_jax.training import lora, steps
from tools import bench_phases
from tools.bench_common import hf_model, interleaved, torch_or_none

LORA_RANK, LORA_ALPHA = 16, 32.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
LEARNING_RATE = 1e-5
# Our full-step contenders: name -> config changes.
OURS = {
    "dropless (sorted)": dict(moe_impl="sorted", capacity_factor=None),
    "dense, capacity factor 1.0": dict(moe_impl="dense", capacity_factor=1.0),
    "dense, capacity factor 1.25": dict(moe_impl="dense", capacity_factor=1.25),
    "dense, dropless (capacity ladder)": dict(moe_impl="dense", capacity_factor=None),
    "dropless (sorted), remat": dict(moe_impl="sorted", capacity_factor=None, remat_policy="full"),
}
# Whose time `bench_phases` splits.
PHASE_VARIANTS = ("dense, capacity factor 1.25", "dropless (sorted)")
HF_FULL, HF_REMAT = "transformers + torch AdamW", "transformers, gradient checkpointing"
OURS_LORA, PEFT = "mixtral_jax LoRA", "peft LoRA"
# LoRA trains through the dense dispatch: the sorted one's own backward pass
# (`moe.trainable_rows`) is for float expert weights without adapters.
LORA_VARIANTS = ("dense, capacity factor 1.25", "dense, dropless (capacity ladder)")


def batch_of(ids: np.ndarray) -> dict[str, jax.Array]:
    """Our batch for token rows `ids` [B, T] that is transformers' `labels=ids`: every
    position predicts the next token, the last one (which has none) weighs 0."""
    weights = np.ones(ids.shape, np.float32)
    weights[:, -1] = 0
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    return {
        "tokens": jnp.asarray(ids, jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "weights": jnp.asarray(weights),
    }


def hf_loss(hf, ids):
    """transformers' training loss: cross-entropy + router_aux_loss_coef x its
    load-balancing loss."""
    return hf(input_ids=ids, labels=ids, output_router_logits=True).loss


def _hf_loss_value(hf, ids) -> float:
    torch, _ = torch_or_none()
    with torch.no_grad():
        return float(hf_loss(hf, ids))


def peft_twin(hf, rank: int = LORA_RANK, alpha: float = LORA_ALPHA, targets=LORA_TARGETS):
    """`hf` with peft's LoRA adapters on `targets` (w1 and w3 together: transformers
    fuses them), A and B both random so that every gradient is informative."""
    from peft import LoraConfig, get_peft_model

    if ("w1" in targets) != ("w3" in targets):
        raise ValueError("peft adapts w1 and w3 as one fused gate_up_proj: target both or neither")
    parameters = ["experts.gate_up_proj"] * ("w1" in targets) + ["experts.down_proj"] * (
        "w2" in targets
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[t for t in targets if t.endswith("_proj")],
        target_parameters=parameters,
        lora_dropout=0.0,
        init_lora_weights=False,  # B random too, not zero
    )
    return get_peft_model(hf, config)


def peft_adapters(peft_model, config: ModelConfig, grads: bool = False) -> dict[Path, np.ndarray]:
    """peft's adapters (or their gradients) in our layout, stacked over layers: A [..., in,
    R], B [..., R, out]. The fused gate_up adapter's A goes to both w1 and w3, its B's
    first F rows to w1 and the rest to w3 (so our w1 and w3 together compute peft's
    delta, and their A gradients sum to peft's)."""
    E, F = config.num_experts, config.intermediate_size
    shapes = {
        "q_proj": ((config.hidden_size,), (config.num_heads, config.head_dim)),
        "k_proj": ((config.hidden_size,), (config.num_kv_heads, config.head_dim)),
        "v_proj": ((config.hidden_size,), (config.num_kv_heads, config.head_dim)),
        "o_proj": ((config.num_heads, config.head_dim), (config.hidden_size,)),
    }
    layers: dict[Path, list] = {}

    def add(path, value):
        layers.setdefault(path, []).append(value)

    modules = dict(peft_model.named_modules())
    for layer in range(config.num_layers):
        prefix = f"base_model.model.model.layers.{layer}."
        for name, (ins, outs) in shapes.items():
            module = modules[prefix + f"self_attn.{name}"]
            a, b = (_tensor(f["default"].weight, grads) for f in (module.lora_A, module.lora_B))
            path = ("layers", "attention", f"{name}_lora")
            add((*path, "a"), a.T.reshape(*ins, -1))  # [r, in] -> [in..., r]
            add((*path, "b"), b.T.reshape(-1, *outs))  # [out, r] -> [r, out...]
        module = modules[prefix + "mlp.experts"]
        while hasattr(module, "parameter_name"):  # peft nests one wrapper per parameter
            a, b = (_tensor(f["default"].weight, grads) for f in (module.lora_A, module.lora_B))
            a = a.reshape(E, -1, a.shape[-1]).transpose(0, 2, 1)  # [E r, in] -> [E, in, r]
            b = b.reshape(b.shape[0], -1, E).transpose(2, 1, 0)  # [out, r E] -> [E, r, out]
            path = ("layers", "moe", "experts")
            if module.parameter_name == "down_proj":
                add((*path, "w2_lora", "a"), a)
                add((*path, "w2_lora", "b"), b)
            else:
                for name, rows in (("w1", slice(0, F)), ("w3", slice(F, 2 * F))):
                    add((*path, f"{name}_lora", "a"), a)
                    add((*path, f"{name}_lora", "b"), b[..., rows])
            module = module.base_layer
    return {path: np.stack(values) for path, values in layers.items()}


def _tensor(weight, grad: bool) -> np.ndarray:
    return (weight.grad if grad else weight).detach().float().numpy()


def our_lora_twin(
    model: Mixtral, peft_model, config: ModelConfig, rank=LORA_RANK, alpha=LORA_ALPHA
) -> Mixtral:
    """`model` with adapters holding `peft_model`'s (made with the same rank and alpha)."""
    ours = lora.add_adapters(model, rank=rank, alpha=alpha, targets=LORA_TARGETS)
    set_params(ours, peft_adapters(peft_model, config))
    return ours


class _Ours:
    """Our train step for `model`'s architecture with `changes`, on one device; every
    variant steps the one state it is given."""

    def __init__(self, model: Mixtral, changes: dict, trainable=nnx.Param):
        self.model = with_config(model, model.config.replace(**changes))
        optimizer = optax.adamw(LEARNING_RATE)
        mesh = make_mesh(devices=jax.devices()[:1])
        self.step = steps.jit_train_step(self.model, optimizer, mesh, trainable=trainable)
        self.metrics: dict = {}

    def run(self, holder: list, batch) -> None:
        holder[0], self.metrics = self.step(holder[0], batch)
        jax.block_until_ready(self.metrics["loss"])


def _our_loss(model: Mixtral, batch) -> float:
    loss, _ = jax.jit(steps.loss_fn)(model, batch)
    return float(loss)


def bench_train(args, config: ModelConfig, peak: float) -> None:
    """The full and the LoRA step at each of `--train_seq_lens`, then where our step's
    time goes (`phases`)."""
    lengths = [int(n) for n in args.train_seq_lens.split(",")]
    print(
        f"\nTraining step: batch {args.train_batch} x {lengths} tokens, {config.num_layers} "
        f"layers, {config.hidden_size} wide, {config.num_experts} experts (top-"
        f"{config.num_experts_per_tok}), {config.dtype}, load-balancing loss x "
        f"{config.router_aux_loss_coef}; MFU of the active FLOPs against the matmul peak"
    )
    whole = {}
    for length in lengths:
        ids = np.random.RandomState(length).randint(
            0, config.vocab_size, (args.train_batch, length)
        )
        whole[length] = _full_steps(args, config, ids, peak)
        gc.collect()
        _lora_steps(args, config, ids, peak)
        gc.collect()
    split = {name: OURS[name] for name in PHASE_VARIANTS}
    seconds = {name: whole[lengths[0]][f"mixtral_jax {name}"] for name in PHASE_VARIANTS}
    bench_phases.phases(args, config, lengths[0], split, seconds)


def _table(title: str, seconds: dict[str, float], tokens: int, flops: float, peak: float,
           reference: str | None, extra: dict[str, str]) -> None:  # fmt: skip
    print(f"\n{title}")
    print(f"  {'':<40} {'time':>10} {'tokens/s':>9} {'MFU':>6} {'vs ' + (reference or '-'):>8}")
    ref = seconds.get(reference) if reference else None
    for name, t in seconds.items():
        ratio = f"{ref / t:5.2f}x" if ref else "    -"
        print(
            f"  {name:<40} {t * 1e3:8.0f} ms {tokens / t:9.0f} {100 * flops / t / peak:5.1f}% "
            f"{ratio:>8}  {extra.get(name, '')}"
        )


def _full_steps(args, config: ModelConfig, ids: np.ndarray, peak: float) -> dict[str, float]:
    torch, _ = torch_or_none()
    batch = batch_of(ids)
    fns: dict[str, Callable[[], object]] = {}
    if torch is None:
        print("  (torch/transformers not installed: no reference rows)")
        model = Mixtral(config, rngs=nnx.Rngs(args.seed))
    else:
        hf = hf_model(config, args.init_std, args.seed).train()
        model = hub.from_hub_state_dict(hf.state_dict(), config)
        ids_t = torch.as_tensor(ids)
        hf_loss_value = _hf_loss_value(hf, ids_t)
        print(
            f"  loss before the first step: transformers {hf_loss_value:.6f}, ours "
            f"{_our_loss(model, batch):.6f}"
        )
        adamw = torch.optim.AdamW(hf.parameters(), lr=LEARNING_RATE)

        def hf_step(remat: bool):
            if remat:
                hf.gradient_checkpointing_enable()
            adamw.zero_grad(set_to_none=True)
            hf_loss(hf, ids_t).backward()
            adamw.step()
            if remat:
                hf.gradient_checkpointing_disable()

        fns[HF_FULL] = lambda: hf_step(False)
        fns[HF_REMAT] = lambda: hf_step(True)
    ours = {name: _Ours(model, changes) for name, changes in OURS.items()}
    holder = [next(iter(ours.values())).step.init(model)]
    del model
    for name, one in ours.items():
        fns[f"mixtral_jax {name}"] = lambda one=one: one.run(holder, batch)
    seconds = interleaved(fns, args.repeats)
    extra = {}
    for name, one in ours.items():
        dropped = float(one.metrics["dropped_fraction"])
        extra[f"mixtral_jax {name}"] = f"dropped {100 * dropped:.1f}% of choices"
    B, T = ids.shape
    _table(
        f"Full fine-tuning step, {B} x {T} tokens (AdamW)",
        seconds,
        B * T,
        training_flops(config, B, T),
        peak,
        HF_FULL if torch is not None else None,
        extra,
    )
    return seconds


def _lora_steps(args, config: ModelConfig, ids: np.ndarray, peak: float) -> None:
    torch, _ = torch_or_none()
    batch = batch_of(ids)
    fns: dict[str, Callable[[], object]] = {}
    if torch is None:
        model = lora.add_adapters(
            Mixtral(config, rngs=nnx.Rngs(args.seed)),
            rank=LORA_RANK,
            alpha=LORA_ALPHA,
            targets=LORA_TARGETS,
        )
    else:
        hf = hf_model(config, args.init_std, args.seed).train()
        base = hub.from_hub_state_dict(hf.state_dict(), config)
        peft_model = peft_twin(hf)
        model = our_lora_twin(base, peft_model, config)
        ids_t = torch.as_tensor(ids)
        print(
            f"  LoRA loss before the first step: peft {_hf_loss_value(peft_model, ids_t):.6f}, "
            f"ours {_our_loss(model, batch):.6f}"
        )
        adamw = torch.optim.AdamW(
            [p for p in peft_model.parameters() if p.requires_grad], lr=LEARNING_RATE
        )

        def peft_step():
            adamw.zero_grad(set_to_none=True)
            hf_loss(peft_model, ids_t).backward()
            adamw.step()

        fns[PEFT] = peft_step
    ours = {name: _Ours(model, OURS[name], trainable=LoRAParam) for name in LORA_VARIANTS}
    holder = [next(iter(ours.values())).step.init(model)]
    for name, one in ours.items():
        fns[f"{OURS_LORA}, {name}"] = lambda one=one: one.run(holder, batch)
    seconds = interleaved(fns, args.repeats)
    B, T = ids.shape
    _table(
        f"LoRA step, rank {LORA_RANK} on {', '.join(LORA_TARGETS)}, {B} x {T} tokens "
        "(the frozen base gets no gradient)",
        seconds,
        B * T,
        training_flops(config, B, T, lora=True),
        peak,
        PEFT if torch is not None else None,
        {},
    )

"""Reference models for the tests: transformers' Mixtral twins built from our configs."""

from __future__ import annotations

import numpy as np
import pytest

from mixtral_jax import ModelConfig
from mixtral_jax.checkpoints import hub


def torch_and_transformers():
    """Imports torch and transformers, skipping the test where they are not installed."""
    torch = pytest.importorskip("torch", reason="parity tests need torch (Python 3.11, test extra)")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def hf_twin(config: ModelConfig, seed: int = 0, init_std: float = 0.1):
    """A random transformers MixtralForCausalLM for `config`, and our model with its weights.

    The weights are larger than the default init (0.02) and the norm scales are
    random, so that logits are O(1), routing is decisive and a swapped or
    transposed tensor shows in the output.
    """
    torch, transformers = torch_and_transformers()
    hf_config = transformers.MixtralConfig(**config.to_hf(), attn_implementation="eager")
    hf_config.initializer_range = init_std
    torch.manual_seed(seed)
    hf = transformers.MixtralForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model = hub.from_hub_state_dict(hf.state_dict(), config)
    return hf, model


def hf_forward(hf, tokens: np.ndarray, attention_mask: np.ndarray | None = None):
    """Logits [B, T, V], router logits per layer [L, B*T, E] and the aux loss, as numpy."""
    torch, _ = torch_and_transformers()
    with torch.no_grad():
        out = hf(
            torch.as_tensor(tokens),
            attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
            output_router_logits=True,
        )
    router_logits = np.stack([r.float().numpy() for r in out.router_logits])
    return out.logits.float().numpy(), router_logits, float(out.aux_loss)


def top_k_without_ties(router_logits: np.ndarray, k: int, margin: float = 1e-5):
    """Top-k experts [..., k] from router logits, and where the k-th choice is not a near-tie."""
    z = router_logits - router_logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, -1)
    clear = np.ones(probs.shape[:-1], bool)
    if k < probs.shape[-1]:
        clear = sorted_probs[..., k - 1] - sorted_probs[..., k] > margin
    return order[..., :k], clear

"""Text generation: batched prefill, jitted decode steps over a KV cache, sampling.

    out = mixtral_jax.generate(model, tokenizer, ["def fibonacci(n):", "class Stack:"])
    python -m mixtral_jax.generate --prompt "def fibonacci(n):"     # the CLI: cli.py

Prompts of different lengths share one batch: they are right-padded, the
padding is its own segment (never attended to, never routed, never cached),
and every row decodes at its own position, so each prompt gets exactly the
tokens it would get alone. The prefill is one jitted call, each decode step
another, with fixed shapes: nothing recompiles from step to step.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import backends
from mixtral_jax.inference.cache import empty_cache
from mixtral_jax.inference.sampling import Sampling, sample
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.mixtral import Mixtral, Unstacked
from mixtral_jax.model.tokenizer import Tokenizer
from mixtral_jax.parallel.rules import DEFAULT_RULES, Rules, use_rules

# on_token(row, token id, text piece): called for every generated token.
TokenCallback = Callable[[int, int, str], None]


class Timing(NamedTuple):
    first_token_s: float  # prefill, and its compilation on a first call
    decode_steps: int  # timed steps: all but the first, which may compile
    decode_s: float

    @property
    def steps_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else float("nan")


class Generation(NamedTuple):
    texts: list[str]  # the generated text of each prompt (without the prompt)
    tokens: list[list[int]]  # the generated ids of each prompt, EOS excluded
    prompt_tokens: list[list[int]]
    timing: Timing


def mesh_rules_of(mesh: jax.sharding.Mesh | None, rules: Rules) -> tuple | None:
    """The (mesh, rules) a jitted step takes as a static argument, None without a mesh."""
    return (mesh, tuple(rules)) if mesh is not None else None


def rules_context(mesh_rules):
    """The activation sharding rules to trace under, when generating on a mesh."""
    return use_rules(*mesh_rules) if mesh_rules else contextlib.nullcontext()


_STATIC = ("graphdef", "sampling", "mesh_rules")


class Static:
    """A jitted step's static argument (a model's nnx.GraphDef, a pytree's structure),
    hashed once. A jitted call hashes its static arguments, and nnx hashes a GraphDef by
    walking it: tens of microseconds on every step, a tenth of a small model's decode
    step on a CPU. Equal values share one Static (`Static.of`): a jitted call that finds
    an equal value in its cache compares the two, and comparing two GraphDefs walks
    both, hundreds of microseconds for a model with a bank of adapters."""

    __slots__ = ("value", "_hash", "__weakref__")
    _interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    @classmethod
    def of(cls, value) -> Static:
        """The Static of `value`, the one already made for an equal value if any."""
        interned = cls._interned.get(value)
        if interned is None:
            interned = cls._interned[value] = cls(value)
        return interned

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and (
            other.value is self.value or other.value == self.value
        )


@jax.tree_util.register_pytree_node_class
class Frozen:
    """A pytree that a jitted step takes on every call unchanged (a model's weights, their
    per-layer views), flattened once. A jitted call flattens its arguments on every call,
    and nnx flattens each of its Variables in Python: tens of microseconds a step for a
    small model, more with a bank of adapters, a good part of a CPU decode step. A Frozen
    flattens to its leaves, with its structure as a `Static`; `thaw` gives the pytree
    back."""

    __slots__ = ("leaves", "structure")

    def __init__(self, leaves: tuple, structure: Static):
        self.leaves, self.structure = leaves, structure

    @classmethod
    def of(cls, tree) -> Frozen:
        leaves, treedef = jax.tree.flatten(tree)
        return cls(tuple(leaves), Static.of(treedef))

    def tree_flatten(self):
        return self.leaves, self.structure

    @classmethod
    def tree_unflatten(cls, structure: Static, leaves) -> Frozen:
        return cls(tuple(leaves), structure)


def thaw(tree):
    """`tree` itself, or the pytree a `Frozen` holds."""
    return (
        jax.tree.unflatten(tree.structure.value, tree.leaves) if isinstance(tree, Frozen) else tree
    )


def merge(graphdef, params):
    """The model from its graph (a GraphDef, or a `Static` holding one) and state (or a
    `Frozen` holding it)."""
    graphdef = graphdef.value if isinstance(graphdef, Static) else graphdef
    return nnx.merge(graphdef, thaw(params))


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def prefill_step(
    graphdef,
    params,
    tokens,
    lengths,
    cache: KVCache,
    key,
    sampling,
    mesh_rules,
    unstacked: Unstacked | None = None,
):
    """tokens [B, T] right-padded to T; lengths [B] -> first new tokens [B], cache.
    `unstacked`: the blocks' weights as a backend's buffers (`Decode.prefill`)."""
    model = merge(graphdef, params)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    with rules_context(mesh_rules):
        out = model.forward(
            tokens,
            positions,
            segment_ids,
            cache=cache,
            logits_at=lengths - 1,
            unstacked=thaw(unstacked),
        )
    return sample(out.logits[:, 0], key, sampling), out.cache


def _decode(
    graphdef,
    params,
    tokens,
    positions,
    cache: KVCache,
    key,
    sampling,
    mesh_rules,
    unstacked: Unstacked | None = None,
):
    """tokens, positions [B] -> next tokens [B], cache. `unstacked`: the blocks' weights
    in buffers of their own (a backend's, `backends.for_decode`)."""
    model = merge(graphdef, params)
    with rules_context(mesh_rules):
        out = model.forward(
            tokens[:, None], positions[:, None], cache=cache, unstacked=thaw(unstacked)
        )
    return sample(out.logits[:, 0], key, sampling), out.cache


@functools.cache
def jitted_decode(compiler_options: tuple[tuple[str, Any], ...] = ()):
    """The decode step jitted with these compiler options (a backend's choice)."""
    return jax.jit(
        _decode,
        static_argnames=_STATIC,
        donate_argnames=("cache",),
        compiler_options=dict(compiler_options) or None,
    )


decode_step = jitted_decode()  # the plain step, as on TPUs


def generate_tokens(
    model: Mixtral,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> tuple[list[list[int]], Timing]:
    """Generated ids for each prompt (lists of ids), and how long it took.

    A row stops at `eos_id` (not included), when `should_stop(row, ids)` says so,
    or after `max_new_tokens`; the batch stops when every row has. With a `mesh`
    (the model loaded or sharded onto it), activations and the KV cache are
    sharded by `rules` too.
    """
    c = model.config
    sampling = sampling or Sampling()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = int(lengths.max())
    if T + max_new_tokens > c.max_position_embeddings:
        raise ValueError(
            f"the longest prompt ({T} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's max_position_embeddings={c.max_position_embeddings}; shorten the prompt "
            "or ask for fewer tokens"
        )
    bad = [t for p in prompts for t in p if not 0 <= t < c.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {c.vocab_size})")
    B = len(prompts)
    tokens = np.zeros((B, T), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt

    graphdef, params = nnx.split(model)
    graphdef, params = Static.of(graphdef), Frozen.of(params)
    decode = backends.for_decode(model, B, mesh)
    step_fn = jitted_decode(decode.compiler_options)
    unstacked = Frozen.of(decode.unstacked)
    cache = empty_cache(c, B, T + max_new_tokens, mesh, rules)
    keys = iter(jax.random.split(jax.random.key(seed), max_new_tokens))
    start = time.perf_counter()
    mesh_rules = mesh_rules_of(mesh, rules)
    next_tokens, cache = prefill_step(
        graphdef,
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        cache,
        next(keys),
        sampling,
        mesh_rules,
        decode.prefill(views=False),  # each prompt length compiles anew
    )
    cache = decode.cache(cache)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    marks = []  # when each step's tokens reached the host
    for step in range(max_new_tokens):
        current = next_tokens
        if step < max_new_tokens - 1:
            # The next step is dispatched before this one's tokens are read, so the
            # host's work (streaming, stop checks) overlaps the device's. Past the last
            # row's end, one step is computed for nothing.
            next_tokens, cache = step_fn(
                graphdef,
                params,
                current,
                jnp.asarray(lengths + step),
                cache,
                next(keys),
                sampling,
                mesh_rules,
                unstacked,
            )
        ids = np.asarray(current)
        marks.append(time.perf_counter())
        for row in np.flatnonzero(~done):
            token = int(ids[row])
            if token == eos_id:
                done[row] = True
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(int(row), token)
            if should_stop is not None and should_stop(int(row), out[row]):
                done[row] = True
        if done.all():
            break
    timed = marks[1:]  # the first decode step compiles on a first call
    decode_s = timed[-1] - timed[0] if len(timed) > 1 else 0.0
    return out, Timing(marks[0] - start, max(len(timed) - 1, 0), decode_s)


def generate(
    model: Mixtral,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: Sequence[str] = (),
    chat: bool = False,
    on_token: TokenCallback | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Generation:
    """Generates from each prompt: a string, a list of strings, or prompts already
    encoded (a list of token ids, or a list of them).

    chat=True wraps each text prompt as one user message in the instruct format.
    Generation of a row ends at EOS, at any of the `stop` strings (cut from the
    text), or after `max_new_tokens`. `on_token(row, id, text piece)` streams;
    a row's pieces concatenate to its text (before the stop-string cut) and never
    split a UTF-8 character that the model completes.
    """
    sampling = Sampling(temperature, top_k, top_p)
    prompt_ids = _prompt_ids(tokenizer, prompts, chat)
    streams = [tokenizer.stream() for _ in prompt_ids]
    texts = [""] * len(prompt_ids)

    def on_id(row: int, token: int) -> None:
        piece = streams[row].add(token)
        texts[row] += piece
        if on_token is not None:
            on_token(row, token, piece)

    def should_stop(row: int, ids: list[int]) -> bool:
        return any(s in texts[row] for s in stop)

    ids, timing = generate_tokens(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        eos_id=tokenizer.eos_id,
        should_stop=should_stop if stop else None,
        on_token=on_id,
        mesh=mesh,
    )
    final = []
    for row, text in enumerate(texts):
        rest = streams[row].flush()  # an incomplete character at the very end
        if rest and on_token is not None:
            on_token(row, ids[row][-1], rest)
        text += rest
        cut = min((text.find(s) for s in stop if s in text), default=len(text))
        final.append(text[:cut])
    return Generation(final, ids, prompt_ids, timing)


def _prompt_ids(tokenizer: Tokenizer | None, prompts, chat: bool) -> list[list[int]]:
    """Each prompt's ids: text encoded (as one user message with `chat`), ids as given."""

    def is_ids(p) -> bool:
        return not isinstance(p, str) and all(isinstance(t, (int, np.integer)) for t in p)

    if isinstance(prompts, str) or (prompts and is_ids(prompts)):
        prompts = [prompts]  # one prompt
    if not prompts:
        raise ValueError("no prompt given: pass a string, a list of strings or of token-id lists")
    for prompt in prompts:
        if not prompt or not (isinstance(prompt, str) or is_ids(prompt)):
            raise ValueError(
                "each prompt must be a non-empty string or a non-empty list of token ids, "
                f"got {prompt!r}"
            )
    if tokenizer is None:
        raise ValueError(
            "generate turns text into text and needs the model's tokenizer "
            "(mixtral_jax.load_tokenizer(DIR)); for token ids in and out without one, use "
            "mixtral_jax.generate_tokens(model, [[1, 15, 27]])"
        )
    if chat and not all(isinstance(p, str) for p in prompts):
        raise ValueError("chat=True wraps text prompts as user messages; give strings")

    def encode(prompt) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            return tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt)

    return [encode(prompt) for prompt in prompts]

"""The serving engine: continuous batching over a fixed number of decode slots.

    engine = Engine(model, max_batch=16, max_len=2048, prefill_chunk=512)
    engine.submit(Request(prompt_ids, max_tokens=64, on_output=print))
    engine.start()          # a thread that steps while there is work (or: engine.step())

Each step (`scheduler.Scheduler` decides what runs) admits waiting requests into
free slots, prefills up to `prefill_chunk` tokens of one or up to `prefill_rows` of
their prompts (in one jitted call on those slots' rows of the KV cache, each attending
over its chunks before), then runs one decode step for every slot whose prompt is in
the cache. A request that ends frees its slot at once; the next step gives it to a
waiting one, whose first chunk forgets what the slot held.

Shapes are fixed: the cache is [L, max_batch, K, max_len, H] (or, paged, a pool of
blocks and a block table per slot: `kv_cache.init_paged_cache`); a prefill call is one
row or `prefill_rows`, its chunks padded to a few bucket lengths (powers of two up to
`prefill_chunk`, and to its share of it per row); the decode step always
runs every slot, idle ones masked (never written, never routed). After `warmup`,
requests coming and going compile nothing. Each request samples with its own
parameters and its own key (`sampling.sample_rows`), and its greedy tokens are
those `generate` gives it alone; a request with a `constraint` (a grammar's,
`grammar.Constraint`) draws, in the same steps, only the tokens it allows. With a bank of
LoRA adapters in the model (`checkpoints.adapters.load_bank`), each request applies its own
(`Request.adapter`) in the same calls as the others, and the prefix cache keeps each
adapter's blocks apart. The decode
step runs on the backend `backends.for_decode` chooses, and the prefill reads the
weights it gives (`Decode.prefill`), as `generate`'s do; the SMoE never drops a token.

With `speculate="ngram:K"`, a decode step where some row finds a draft in its own
context (`speculate.Ngram`) verifies the drafts instead, every slot's newest token and
draft in one call as wide as the longest draft needs (`verify_drafts`): each row gets
its kept drafts and one token more (`speculate.accept`), the tokens plain decoding
gives a greedy row, and a sampling row's tokens as plain sampling would draw them.
With `jump_forward=K`, a constrained row drafts the tokens its grammar forces next
(up to K: a schema's keys, quotes, brackets) and verifies them so, each position under
the grammar's mask there, in the steps that may speculate: the tokens a step gives are
still those plain steps would.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import backends
from mixtral_jax.inference.blocks import BlockPool
from mixtral_jax.inference.cache import empty_cache
from mixtral_jax.inference.generate import (
    Frozen,
    Static,
    merge,
    mesh_rules_of,
    rules_context,
    thaw,
)
from mixtral_jax.inference.grammar import fill_masks, free_masks
from mixtral_jax.inference.requests import (
    MAX_TOP_LOGPROBS,
    Output,
    QueueFull,
    Request,
    TokenLogprob,
)
from mixtral_jax.inference.sampling import Logprobs, RowSampling, logprobs, sample_rows
from mixtral_jax.inference.scheduler import Chunk, Scheduler, Sequence
from mixtral_jax.inference.speculate import MAX_DRAFT, Ngram, accept, widths
from mixtral_jax.model.kv_cache import KVCache, blocks_per_row, row_length
from mixtral_jax.model.mixtral import Mixtral, Unstacked
from mixtral_jax.parallel.rules import DEFAULT_RULES, Rules

log = logging.getLogger(__name__)

# Defaults: the most prompt tokens per step, and prompts per prefill call.
PREFILL_CHUNK, PREFILL_ROWS = 512, 4
# Speculative decoding on a CPU: at most this many decoding rows verify drafts. A verify
# step computes every draft token, and a CPU's steps are bound by compute from a few rows
# on, where the drafts then cost more than they save (docs/serving.md has the figures).
SPECULATE_ROWS_CPU = 2
# What the KV cache may store: the model's compute dtype (None), or int8 with a scale
# per key (value) and head, half of bfloat16's memory.
KV_DTYPES = (None, "int8", "bfloat16", "float32")


def _slot_axis(cache: KVCache) -> int:
    """Where the slots (the batch) are in the keys and values: [B, K, S, H] per layer,
    or [L, B, K, S, H] (positions are [B, S])."""
    return 0 if isinstance(cache.k, tuple) else 1


_BUFFERS = ("k", "v", "k_scale", "v_scale")  # a contiguous cache's, by slot


def _slot_rows(cache: KVCache, slots: jax.Array) -> KVCache:
    """The cache's rows of `slots` [R] (batch R); a slot past the end (an unused row of
    a call) reads as empty. A paged cache's rows are their positions and block tables
    (no block for an unused row); the pool is every row's."""

    def take(a, axis, fill):
        return jnp.take(a, slots, axis=axis, mode="fill", fill_value=fill)

    rows = cache._replace(positions=take(cache.positions, 0, -1))
    if cache.blocks is not None:
        no_block = jax.tree.leaves(cache.k)[0].shape[-4]
        return rows._replace(blocks=take(cache.blocks, 0, no_block))
    axis = _slot_axis(cache)
    return rows._replace(
        **{
            name: jax.tree.map(lambda a: take(a, axis, 0), getattr(cache, name))
            for name in _BUFFERS
        }
    )


def _put_slot_rows(cache: KVCache, rows: KVCache, slots: jax.Array) -> KVCache:
    """`rows` written back into the cache at `slots`; a slot past the end is dropped."""

    def put(a, r, axis):
        return a.at[(slice(None),) * axis + (slots,)].set(r, mode="drop")

    positions = put(cache.positions, rows.positions, 0)
    if cache.blocks is not None:  # the pool as the call left it; the tables as they were
        return rows._replace(positions=positions, blocks=cache.blocks)
    axis = _slot_axis(cache)
    return cache._replace(
        positions=positions,
        **{
            name: jax.tree.map(
                lambda a, r: put(a, r, axis), getattr(cache, name), getattr(rows, name)
            )
            for name in _BUFFERS
        },
    )


def _forward_chunks(
    model: Mixtral,
    cache,
    tokens,
    starts,
    lengths,
    mesh_rules,
    unstacked,
    adapter_ids,
    logits_at=None,
):
    """tokens [R, C] continuing each row's cache at positions starts[r] onwards, the
    first lengths[r] real (padding is never written), each row with its adapter."""
    index = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    with rules_context(mesh_rules):
        return model.forward(
            tokens,
            starts[:, None] + index,
            (index < lengths[:, None]).astype(jnp.int32),
            cache=cache,
            chunk=True,
            logits_at=logits_at,
            unstacked=thaw(unstacked),
            adapter_ids=adapter_ids,
        )


_STATIC = ("graphdef", "mesh_rules", "prompt_logprobs")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def prefill_chunks(
    graphdef,
    params,
    cache: KVCache,
    slots,
    tokens,
    starts,
    lengths,
    fresh,
    targets,
    rows: RowSampling,
    mesh_rules,
    prompt_logprobs: bool,
    unstacked: Unstacked | None = None,
    adapter_ids=None,
):
    """R prompts' chunks in one call: tokens [R, C] (row r's first lengths[r] real, at
    positions starts[r]..) into the cache rows of slots [R] (emptied first where
    `fresh`, but for the positions before starts[r], which a paged cache's prefix
    cache holds; a slot past the end is an unused row). Returns the token each row draws
    from its last real token's logits, with its log-probabilities; with
    `prompt_logprobs`, those of `targets` [R, C] (the prompts' next tokens) everywhere.
    `unstacked`: the blocks' weights as a backend's buffers (`Decode.prefill`).
    `adapter_ids` [R]: each row's adapter of the model's bank (-1: none), or None
    for a model without one."""
    model = merge(graphdef, params)
    own = _slot_rows(cache, slots)
    # A new prompt's row forgets what its slot held, but the prompt's first `starts`
    # tokens, whose keys are in the blocks the prefix cache gave it.
    S = own.positions.shape[1]
    held = jnp.where(jnp.arange(S) < starts[:, None], jnp.arange(S, dtype=jnp.int32), -1)
    own = own._replace(positions=jnp.where(fresh[:, None], held, own.positions))
    last = jnp.maximum(lengths - 1, 0)  # [R]
    # Every position's logits only when the prompt's log-probabilities are asked.
    logits_at = None if prompt_logprobs else last
    out = _forward_chunks(
        model, own, tokens, starts, lengths, mesh_rules, unstacked, adapter_ids, logits_at
    )
    cache = _put_slot_rows(cache, out.cache, slots)
    at = last if prompt_logprobs else jnp.zeros_like(last)
    final = jnp.take_along_axis(out.logits, at[:, None, None], axis=1)[:, 0]  # [R, V]
    token = sample_rows(final, rows)
    drawn = logprobs(final, token, MAX_TOP_LOGPROBS)
    prompt = logprobs(out.logits, targets, MAX_TOP_LOGPROBS) if prompt_logprobs else None
    return token, drawn, prompt, cache


def _decode(
    graphdef,
    params,
    cache: KVCache,
    tokens,
    positions,
    active,
    rows: RowSampling,
    mesh_rules,
    with_logprobs: bool,
    unstacked: Unstacked | None,
    adapter_ids=None,
):
    """One token for every active slot: tokens, positions, active [B] -> next tokens
    [B] (and their log-probabilities), cache. Idle slots are padding: never written.
    `adapter_ids` [B]: each slot's adapter (`prefill_chunks`)."""
    model = merge(graphdef, params)
    with rules_context(mesh_rules):
        out = model.forward(
            tokens[:, None],
            positions[:, None],
            active.astype(jnp.int32)[:, None],
            cache=cache,
            unstacked=thaw(unstacked),
            adapter_ids=adapter_ids,
        )
    logits = out.logits[:, 0]
    token = sample_rows(logits, rows)
    drawn = logprobs(logits, token, MAX_TOP_LOGPROBS) if with_logprobs else None
    return token, drawn, out.cache


def verify_drafts(
    graphdef,
    params,
    cache: KVCache,
    tokens,
    positions,
    lengths,
    rows: RowSampling,
    mesh_rules,
    with_logprobs: bool,
    unstacked: Unstacked | None,
    adapter_ids=None,
):
    """A speculative decode step: tokens [B, T], each row's newest token then its draft,
    at positions[b] onwards, the first lengths[b] real (0: an idle slot, never written).
    Returns the tokens each row emits [B, T] and how many [B] (`speculate.accept`), their
    log-probabilities, and the cache. Rejected drafts' keys stay in the cache at
    positions the row has not reached: no query sees them before they are overwritten."""
    model = merge(graphdef, params)
    out = _forward_chunks(
        model, cache, tokens, positions, lengths, mesh_rules, unstacked, adapter_ids
    )
    emitted, count = accept(out.logits, tokens[:, 1:], jnp.maximum(lengths - 1, 0), rows)
    drawn = logprobs(out.logits, emitted, MAX_TOP_LOGPROBS) if with_logprobs else None
    return emitted, count, drawn, out.cache


@functools.cache
def jitted_decode(compiler_options: tuple = (), step=_decode):
    """The decode step (or `verify_drafts`), jitted with the backend's compiler options
    (none: the plain path, as on a TPU)."""
    return jax.jit(
        step,
        static_argnames=("graphdef", "mesh_rules", "with_logprobs"),
        donate_argnames=("cache",),
        compiler_options=dict(compiler_options) or None,
    )


class Engine:
    """Continuous batching for `model` (module docstring). Thread-safe: `submit` and
    `cancel` from any thread; `step` from one (the engine's own after `start`).

    max_batch: decode slots. max_len: the longest prompt + answer a slot holds.
    prefill_chunk: the most prompt tokens one step prefills, in one call of one prompt
    or of up to `prefill_rows` (each its share, at least `scheduler.MIN_BUCKET`).
    max_queue: requests waiting, beyond the free slots, before `submit` raises
    QueueFull. With a `mesh` (the model on it), the cache is split over it by `rules`
    and the steps shard as `generate`'s.
    block_size: a paged cache of `kv_blocks` blocks of this many tokens (default: as
    many as the slots would hold), a request holding those its prompt and max_tokens
    fill (`blocks.BlockPool`), sharing cached prompt prefixes unless `prefix_caching` is
    off. kv_dtype: what the cache stores (`KV_DTYPES`; None: the compute dtype).
    speculate: "ngram:K" (or a `speculate.Ngram`): each decode step of at most
    `speculate_rows` rows (default: SPECULATE_ROWS_CPU on a CPU, every row elsewhere)
    drafts K tokens a row from its context and verifies them in one call.
    jump_forward: a constrained row's step, where steps speculate (`speculate_rows`),
    verifies up to this many tokens its grammar forces (0: none); with or without
    `speculate` for the free rows.
    """

    def __init__(
        self,
        model: Mixtral,
        *,
        max_batch: int = 16,
        max_len: int = 2048,
        prefill_chunk: int = PREFILL_CHUNK,
        prefill_rows: int = PREFILL_ROWS,
        max_queue: int = 256,
        mesh: jax.sharding.Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        block_size: int | None = None,
        kv_blocks: int | None = None,
        prefix_caching: bool = True,
        kv_dtype: str | None = None,
        speculate: str | Ngram | None = None,
        speculate_rows: int | None = None,
        jump_forward: int = 0,
    ):
        c = model.config
        optional = dict(block_size=block_size, kv_blocks=kv_blocks, speculate_rows=speculate_rows)
        for name, value in (
            ("max_batch", max_batch),
            ("max_len", max_len),
            ("prefill_chunk", prefill_chunk),
            ("prefill_rows", prefill_rows),
            ("max_queue", max_queue),
            # None is these settings' default; a value given is checked as the others.
            *((name, value) for name, value in optional.items() if value is not None),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(
                f"kv_dtype {kv_dtype!r} is not one of {', '.join(map(str, KV_DTYPES[1:]))} "
                "(or None: the model's compute dtype)"
            )
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds the model's max_position_embeddings "
                f"{c.max_position_embeddings}; lower it"
            )
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        prefill_chunk = min(prefill_chunk, max_len)
        self.drafter = Ngram.parse(speculate) if isinstance(speculate, str) else speculate
        if isinstance(jump_forward, bool) or not isinstance(jump_forward, int):
            raise ValueError(f"jump_forward must be an integer, got {jump_forward!r}")
        if not 0 <= jump_forward <= MAX_DRAFT:
            raise ValueError(
                f"jump_forward verifies 0 to {MAX_DRAFT} forced tokens a step, not {jump_forward}"
            )
        for what, k in (
            ("speculate", self.drafter and self.drafter.k),
            ("jump_forward", jump_forward),
        ):
            if k and k >= prefill_chunk:
                # A sliding window's rolling buffer holds prefill_chunk - 1 tokens past
                # the window: a step may write no more than that.
                raise ValueError(
                    f"{what} drafts {k} tokens a step, which needs a prefill_chunk above "
                    f"it (got {prefill_chunk}); draft fewer"
                )
        self.jump_forward = jump_forward
        # The widths verify calls compile for: both kinds of drafts'.
        self._widths = tuple(
            sorted(
                set(self.drafter.widths() if self.drafter else ())
                | set(widths(jump_forward) if jump_forward else ())
            )
        )
        pool, paged = None, None
        if block_size is not None:
            per_row = blocks_per_row(c, max_len, block_size, prefill_chunk)
            kv_blocks = kv_blocks or max_batch * per_row
            if kv_blocks < per_row:
                raise ValueError(
                    f"kv_blocks {kv_blocks} cannot hold one request of max_len {max_len}: "
                    f"it needs {per_row} blocks of {block_size}; raise kv_blocks or lower max_len"
                )
            # A rolling buffer shorter than a request overwrites its own blocks: not shared.
            rolls = row_length(c, max_len, prefill_chunk) < max_len
            pool = BlockPool(kv_blocks, block_size, per_row, prefix_caching and not rolls)
            paged = (kv_blocks, block_size)
        elif kv_blocks is not None:
            raise ValueError("kv_blocks sizes a paged cache: give block_size too")
        self.scheduler = Scheduler(max_batch, prefill_chunk, prefill_rows, max_queue, pool)
        graphdef, params = nnx.split(model)
        # The weights go to every step unchanged: flattened once (`Frozen`).
        self._graphdef, self._params = Static.of(graphdef), Frozen.of(params)
        self._mesh_rules = mesh_rules_of(mesh, rules)
        self._backend = backends.for_decode(model, max_batch, mesh)
        self._decode_fn = jitted_decode(self._backend.compiler_options)
        self._verify_fn = jitted_decode(self._backend.compiler_options, verify_drafts)
        if speculate_rows is None:
            speculate_rows = SPECULATE_ROWS_CPU if backends.on_cpu(model) else max_batch
        self.speculate_rows = speculate_rows
        self._prefill_weights = Frozen.of(self._backend.prefill())
        self._unstacked = Frozen.of(self._backend.unstacked)
        self._new_cache = functools.partial(
            empty_cache, c, max_batch, max_len, mesh, rules, kv_dtype, prefill_chunk, paged
        )
        self.cache = self._fresh_cache()
        self._lock = threading.Condition()
        self._incoming: list[Sequence] = []
        self._cancels: set[str] = set()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Since the engine started: tokens generated; seconds spent prefilling and
        # decoding; decode steps by their rows (a step's cost hardly depends on its rows,
        # so these say how full the steps ran).
        self.tokens_generated = 0
        self.busy_seconds = {"prefill": 0.0, "decode": 0.0}
        self.decode_steps = [0] * (max_batch + 1)
        # Speculative decoding: steps that verified drafts, tokens drafted, tokens kept.
        self.verify_steps = self.drafted_tokens = self.accepted_tokens = 0

    # ---- from any thread ----

    def submit(self, request: Request) -> None:
        """Queues `request`; raises RequestError (what is wrong, `param` naming the
        field) or QueueFull (retry later; also once `stop` has begun)."""
        request.check(self.model.config.vocab_size, self.max_len, self.model.config.lora_bank)
        seed = random.getrandbits(32) if request.seed is None else request.seed % 2**32
        with self._lock:
            if not self._accepting:
                raise QueueFull("the server is shutting down and takes no new requests")
            if self.scheduler.full(len(self._incoming)):
                raise QueueFull(
                    f"{self.queue_depth} requests are waiting for a slot (max_queue "
                    f"{self.scheduler.max_queue}); retry later"
                )
            self._incoming.append(Sequence(request, seed))
            self._lock.notify_all()

    def cancel(self, request_id: str) -> None:
        """Ends the request at the next step, its slot free for the step after, with a
        last output `finish_reason="cancelled"`; nothing if it has ended already."""
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify_all()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._incoming) + len(self.scheduler.waiting)

    @property
    def decode_rows(self) -> int:
        """Rows the decode steps computed since the engine started."""
        return sum(rows * steps for rows, steps in enumerate(self.decode_steps))

    @property
    def active_slots(self) -> int:
        return len(self.scheduler.running)

    def busy(self) -> bool:
        return bool(self._incoming or self.scheduler.busy)

    def start(self) -> None:
        """Steps on a thread of the engine's own whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="mixtral-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Takes no new requests, finishes those it has (for `timeout` seconds at most),
        cancels what is left, and ends the thread."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        with self._lock:  # what is left is cancelled on the engine's thread
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()
        self._thread = None

    # ---- on the engine's thread ----

    def step(self) -> list[Output]:
        """One step: admit, prefill chunks, decode. Returns what it produced, one output
        per request that has news, each also given to its request's `on_output`."""
        news: dict[Sequence, None] = {}  # in order, once each
        self._take_incoming(news)
        self.scheduler.admit()
        start = time.perf_counter()
        chunks = self.scheduler.chunks()
        self._sync_blocks()  # after chunks(): a first chunk may take cached prefix blocks
        if chunks:  # (reads the drawn tokens back: the call is done)
            self._guarded([c.sequence for c in chunks], news, self._prefill, chunks, news)
        prefilled = time.perf_counter()
        decoding = self.scheduler.decoding()
        if decoding:
            self._guarded(decoding, news, self._decode, decoding, news)
        self.busy_seconds["prefill"] += prefilled - start
        self.busy_seconds["decode"] += time.perf_counter() - prefilled
        if decoding:
            self.decode_steps[len(decoding)] += 1
        outputs = [(sequence, sequence.output()) for sequence in news]
        self._deliver(outputs)
        return [output for _, output in outputs]

    def run_until_idle(self) -> None:
        """Steps until no request is left (tests and benchmarks drive it so, no thread)."""
        while self.busy():
            self.step()

    def warmup(self) -> None:
        """Compiles every program requests can need: each shape of a prefill call
        (`Scheduler.shapes`), with and without the prompts' log-probabilities; the
        decode step with and without log-probabilities."""
        programs = []
        for rows, n in self.scheduler.shapes():
            chunks = [Chunk(Sequence(Request([0] * n, 1), 0, i), 0, n) for i in range(rows)]
            programs += [(prefill_chunks, self._prefill_args(chunks, p)) for p in (0, 1)]
        programs += [(self._decode_fn, self._decode_args([], p)) for p in (False, True)]
        programs += [
            (self._verify_fn, self._verify_args([], {}, {}, p, width))
            for width in self._widths
            for p in (False, True)
        ]
        for jitted, args in programs:
            jitted.lower(*args).compile()  # cached for the calls to come

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.busy() and not self._stopping and self._accepting:
                    self._lock.wait()
                if not self.busy() and (self._stopping or not self._accepting):
                    return
            try:
                self.step()
            except Exception:  # a bug, not one request's fault: fail them all, go on
                log.exception("an engine step failed; failing the requests in flight")
                news: dict[Sequence, None] = {}
                for sequence in list(self.scheduler.running):
                    self._end(sequence, news, "error", "internal error in the engine")
                self._deliver([(s, s.output()) for s in news])

    def _take_incoming(self, news: dict) -> None:
        """New requests onto the queue; cancelled ones (every one, once `stop` has
        waited its time) ended."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, set()
            everything = self._stopping
        self.scheduler.waiting.extend(incoming)  # held to max_queue by submit
        for sequence in self.scheduler.running + list(self.scheduler.waiting):
            if everything or sequence.request.id in cancels:
                self._end(sequence, news, "cancelled")

    def _end(self, sequence: Sequence, news: dict, reason: str, error: str | None = None):
        if sequence.finish_reason is None:
            self.scheduler.remove(sequence)
            sequence.finish_reason, sequence.error = reason, error
            news[sequence] = None

    def _accept(self, sequence: Sequence, token: int, logprob: TokenLogprob, news: dict):
        """A drawn token: kept (unless a stop id), and the sequence ended when done."""
        r = sequence.request
        news[sequence] = None
        if token in r.stop_ids:
            self._end(sequence, news, "stop")
            return
        sequence.generated.append(token)
        sequence.new_tokens.append(token)
        self.tokens_generated += 1
        if r.logprobs is not None:
            sequence.new_logprobs.append(logprob)
        if r.constraint is not None and not r.constraint.advance(token):
            self._end(sequence, news, "error", f"the grammar failed: {r.constraint.error}")
        elif r.constraint is not None and r.constraint.finished:
            self._end(sequence, news, "stop")
        elif len(sequence.generated) >= r.max_tokens:
            self._end(sequence, news, "length")

    def _guarded(self, sequences: list[Sequence], news: dict, fn, *args) -> None:
        """fn(*args); if it raises, those `sequences` fail alone (all running ones if
        the failed call had consumed the cache, which is then made anew)."""
        try:
            fn(*args)
        except Exception as e:
            log.exception("a step failed for %d request(s)", len(sequences))
            if any(a.is_deleted() for a in jax.tree.leaves(self.cache)):
                self.cache = self._fresh_cache()
                sequences = list(self.scheduler.running)
                if self.scheduler.pool is not None:  # the cached prefixes went with it
                    self.scheduler.pool.forget()
            for sequence in sequences:
                self._end(sequence, news, "error", f"{type(e).__name__}: {e}")

    def _deliver(self, outputs: list[tuple[Sequence, Output]]) -> None:
        """Each output to its request's `on_output`; one that raises ends that request
        alone, with an error output."""
        for sequence, output in outputs:
            on_output = sequence.request.on_output
            if on_output is None:
                continue
            try:
                on_output(output)
            except Exception as e:
                log.exception("request %s: its on_output raised", output.request_id)
                if output.finished:
                    continue
                news: dict[Sequence, None] = {}
                self._end(sequence, news, "error", f"{type(e).__name__}: {e}")
                try:
                    on_output(sequence.output())
                except Exception:
                    log.exception("request %s: its error output raised", output.request_id)

    # ---- device calls ----

    def _fresh_cache(self) -> KVCache:
        """An empty cache in the backend's layout, committed to the model's devices as
        the steps' outputs are (a jitted call compiles anew for an uncommitted one)."""
        cache = self._backend.cache(self._new_cache())
        if self._mesh_rules is None:  # on the parameters' one device, as they are placed
            placed = jax.tree.leaves(self._params)[0].sharding
            if isinstance(placed, jax.sharding.NamedSharding):
                placed = jax.sharding.NamedSharding(placed.mesh, jax.sharding.PartitionSpec())
            cache = jax.device_put(cache, placed)
        self._table = None if cache.blocks is None else np.asarray(cache.blocks)
        return cache

    def _sync_blocks(self) -> None:
        """A paged cache's block tables, as the running sequences hold their blocks."""
        if self._table is None:
            return
        table = np.full_like(self._table, self.scheduler.pool.num_blocks)
        for sequence in self.scheduler.running:
            table[sequence.slot, : len(sequence.blocks)] = sequence.blocks
        if not np.array_equal(table, self._table):
            placed = self.cache.blocks.sharding
            self.cache = self.cache._replace(blocks=jax.device_put(table, placed))
            self._table = table

    def _prefill(self, chunks: list[Chunk], news: dict) -> None:
        prompt_logprobs = any(c.sequence.request.prompt_logprobs is not None for c in chunks)
        args = self._prefill_args(chunks, prompt_logprobs)
        tokens, drawn, prompt, self.cache = prefill_chunks(*args)
        tokens = np.asarray(tokens)
        pool = self.scheduler.pool
        for row, chunk in enumerate(chunks):
            sequence, r = chunk.sequence, chunk.sequence.request
            sequence.prefilled += chunk.length
            if pool is not None:
                pool.register(r.prompt, sequence.blocks, sequence.prefilled, r.kv_namespace)
            if r.prompt_logprobs is not None:
                if chunk.start == 0:
                    sequence.prompt_logprobs = [TokenLogprob(None)]
                # Position i's log-probabilities are those of prompt token i + 1; the
                # last position's next token is the one drawn.
                real = chunk.length - 1 if chunk.last else chunk.length
                sequence.prompt_logprobs += _token_logprobs(
                    prompt, r.prompt_logprobs, (row, slice(real))
                )
            if not chunk.last:
                continue
            if r.max_tokens == 0:
                self._end(sequence, news, "length")
                continue
            logprob = _token_logprobs(drawn, r.logprobs or 0, slice(row, row + 1))[0]
            self._accept(sequence, int(tokens[row]), logprob, news)

    def _prefill_args(self, chunks: list[Chunk], prompt_logprobs: bool) -> tuple:
        """The arrays of one call for `chunks`: [R, C] with R and C the smallest buckets
        that hold them; unused rows point past the last slot."""
        R, C = self.scheduler.shape(chunks)
        tokens, targets = np.zeros((R, C), np.int32), np.zeros((R, C), np.int32)
        slots = np.full(R, self.max_batch, np.int32)
        starts, lengths = np.zeros(R, np.int32), np.zeros(R, np.int32)
        fresh = np.zeros(R, bool)
        for row, chunk in enumerate(chunks):
            prompt = chunk.sequence.request.prompt
            tokens[row, : chunk.length] = prompt[chunk.start : chunk.start + chunk.length]
            after = prompt[chunk.start + 1 : chunk.start + chunk.length + 1]
            targets[row, : len(after)] = after
            slots[row], starts[row], lengths[row] = chunk.sequence.slot, chunk.start, chunk.length
            fresh[row] = chunk.start == chunk.sequence.cached
        sampling = self._row_sampling([c.sequence for c in chunks], R, by_slot=False)
        return (
            self._graphdef,
            self._params,
            self.cache,
            slots,
            tokens,
            starts,
            lengths,
            fresh,
            targets,
            sampling,
            self._mesh_rules,
            bool(prompt_logprobs),
            self._prefill_weights,
            self._adapter_ids([c.sequence for c in chunks], R, by_slot=False),
        )

    def _decode(self, decoding: list[Sequence], news: dict) -> None:
        with_logprobs = any(s.request.logprobs is not None for s in decoding)
        drafts, masks = self._drafts(decoding)
        if any(drafts.values()):
            self._verify(decoding, drafts, masks, with_logprobs, news)
            return
        tokens, drawn = self._run_decode(decoding, with_logprobs)
        tokens = np.asarray(tokens)
        for sequence in decoding:
            slot, n = sequence.slot, sequence.request.logprobs or 0
            logprob = _token_logprobs(drawn, n, slice(slot, slot + 1))[0] if with_logprobs else None
            self._accept(sequence, int(tokens[slot]), logprob, news)

    def _run_decode(self, decoding: list[Sequence], with_logprobs: bool):
        token, drawn, self.cache = self._decode_fn(*self._decode_args(decoding, with_logprobs))
        return token, drawn

    def _drafts(self, decoding: list[Sequence]) -> tuple[dict, dict]:
        """Each row's draft (none in a step of more than `speculate_rows` rows), short
        enough that the row's longest run (draft and one token) stays within max_tokens:
        its positions then stay within the cache. A constrained row's is what its
        grammar forces, with its masks along it ([n + 1, W], by row)."""
        drafts: dict[Sequence, list[int]] = {}
        masks: dict[Sequence, np.ndarray] = {}
        if not self._widths or len(decoding) > self.speculate_rows:
            return drafts, masks
        vocab_size = self.model.config.vocab_size
        for s in decoding:
            r, limit = s.request, s.request.max_tokens - len(s.generated) - 1
            if r.constraint is not None:
                drafts[s], mask = r.constraint.draft(min(self.jump_forward, limit), vocab_size)
                if mask is not None:
                    masks[s] = mask
            elif self.drafter is not None:
                drafts[s] = self.drafter.propose([*r.prompt, *s.generated], limit)
            else:
                drafts[s] = []
        return drafts, masks

    def _verify(
        self, decoding: list[Sequence], drafts: dict, masks: dict, with_logprobs: bool, news: dict
    ) -> None:
        # The call is as wide as the longest draft needs (a few widths compile).
        longest = max(map(len, drafts.values()))
        width = next(w for w in self._widths if w > longest)
        args = self._verify_args(decoding, drafts, masks, with_logprobs, width)
        emitted, count, drawn, self.cache = self._verify_fn(*args)
        emitted, count = np.asarray(emitted), np.asarray(count)
        self.verify_steps += 1
        for sequence in decoding:
            slot, n, top = sequence.slot, int(count[sequence.slot]), sequence.request.logprobs
            self.drafted_tokens += len(drafts[sequence])
            self.accepted_tokens += n - 1
            logprobs = (
                _token_logprobs(drawn, top or 0, (slot, slice(n))) if with_logprobs else [None] * n
            )
            for token, logprob in zip(emitted[slot, :n], logprobs, strict=True):
                if sequence.finish_reason is None:  # a stop id or max_tokens ends the run
                    self._accept(sequence, int(token), logprob, news)

    def _verify_args(
        self, decoding: list[Sequence], drafts: dict, masks: dict, with_logprobs: bool, width: int
    ) -> tuple:
        """The arrays of a verify call of `width` tokens a row (a draft and its row's
        newest token), each row's masks one a position."""
        B, T = self.max_batch, width
        tokens, positions = np.zeros((B, T), np.int32), np.zeros(B, np.int32)
        lengths = np.zeros(B, np.int32)
        for sequence in decoding:
            draft, slot = drafts[sequence], sequence.slot
            tokens[slot, 0] = sequence.generated[-1]
            tokens[slot, 1 : 1 + len(draft)] = draft
            positions[slot], lengths[slot] = sequence.position, 1 + len(draft)
        sampling = self._row_sampling(decoding, B, masked=masks)
        # Each position's mask: a row's own (all ones if free, its next token's if it
        # has no draft), or along its grammar's draft.
        allowed = np.repeat(sampling.allowed[:, None], T, axis=1)
        for sequence, mask in masks.items():
            allowed[sequence.slot, : len(mask)] = mask
        sampling = sampling._replace(allowed=allowed)
        return self._step_args(
            decoding, with_logprobs, tokens, positions, lengths, sampling=sampling
        )

    def _decode_args(self, decoding: list[Sequence], with_logprobs: bool) -> tuple:
        B = self.max_batch
        tokens, positions = np.zeros(B, np.int32), np.zeros(B, np.int32)
        active = np.zeros(B, bool)
        for sequence in decoding:
            tokens[sequence.slot] = sequence.generated[-1]
            positions[sequence.slot] = sequence.position
            active[sequence.slot] = True
        sampling = self._row_sampling(decoding, B)
        return self._step_args(
            decoding, with_logprobs, tokens, positions, active, sampling=sampling
        )

    def _step_args(
        self, decoding: list[Sequence], with_logprobs: bool, *arrays, sampling: RowSampling
    ) -> tuple:
        """A decode (or verify) step's arguments around its `arrays`, a row per slot."""
        return (
            self._graphdef,
            self._params,
            self.cache,
            *arrays,
            sampling,
            self._mesh_rules,
            with_logprobs,
            self._unstacked,
            self._adapter_ids(decoding, self.max_batch),
        )

    def _adapter_ids(
        self, sequences: list[Sequence], rows: int, by_slot: bool = True
    ) -> np.ndarray | None:
        """Each sequence's adapter at its slot's row (or in the order given), -1 for none
        and on unused rows; None for a model without a bank of adapters."""
        if not self.model.config.lora_bank:
            return None
        ids = np.full(rows, -1, np.int32)
        for i, sequence in enumerate(sequences):
            adapter = sequence.request.adapter
            ids[sequence.slot if by_slot else i] = -1 if adapter is None else adapter
        return ids

    def _row_sampling(
        self, sequences: list[Sequence], rows: int, by_slot: bool = True, masked=()
    ) -> RowSampling:
        """Each sequence's sampling, at its slot's row (or in the order given), with its
        constraint's mask of the tokens it may draw next (but for those `masked`
        already: all ones)."""
        temperature, top_k = np.zeros(rows, np.float32), np.zeros(rows, np.int32)
        top_p, seed = np.ones(rows, np.float32), np.zeros(rows, np.uint32)
        step = np.zeros(rows, np.int32)
        allowed, constrained = free_masks(rows, self.model.config.vocab_size), []
        for i, sequence in enumerate(sequences):
            i = sequence.slot if by_slot else i
            r = sequence.request
            temperature[i], top_k[i], top_p[i] = r.temperature, r.top_k, r.top_p
            seed[i], step[i] = sequence.seed, len(sequence.generated)
            if r.constraint is not None and sequence not in masked:
                constrained.append((r.constraint, i))
        fill_masks(constrained, allowed)
        return RowSampling(temperature, top_k, top_p, seed, step, allowed)


def _token_logprobs(lp: Logprobs, top: int, rows: slice | tuple) -> list[TokenLogprob]:
    """`rows` of `lp` as TokenLogprobs, with `top` alternatives each."""
    chosen, ids, values = (np.asarray(a)[rows] for a in lp)
    return [
        TokenLogprob(float(c), tuple(zip(map(int, i[:top]), map(float, v[:top]), strict=True)))
        for c, i, v in zip(chosen, ids, values, strict=True)
    ]

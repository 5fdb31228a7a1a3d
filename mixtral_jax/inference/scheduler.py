"""Continuous batching's bookkeeping: a queue, a fixed number of slots, chunked prefill.

Plain Python, no JAX: the engine asks it each step what to run.

    waiting (FIFO, at most max_queue) --admit--> a free slot --prefill chunks--> decode
    --stop id / max_tokens / cancel--> the slot is free again, for the next step

Each step admits waiting requests into free slots, hands out prefill chunks (at most
`prefill_chunk` prompt tokens in one call: a long prompt is prefilled over several
steps while the others keep decoding), then one decode step for every slot whose
prompt is in the cache.

With a paged cache (`blocks.BlockPool`), a request is admitted only when the pool has
the blocks its prompt and `max_tokens` can fill, which it holds until it ends: the
head of the queue waits for them (nothing is preempted, so nothing is recomputed), and
a request in a slot never runs out of room. When its first chunk is chosen, the blocks
of its prompt's longest prefix in the prefix cache take the place of its first ones,
and its prefill starts after them.

A prefill call is padded to fixed shapes, `rows` prompts of `length` tokens from a few
buckets, and padding is not free: attention and the projections compute it (the
experts skip it; docs/serving.md has the figures). So the step's chunks are those of
the call that pads least: the oldest prompt alone, with the whole budget, or the
`prefill_rows` oldest, each with its share of it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from mixtral_jax.inference.blocks import BlockPool
from mixtral_jax.inference.requests import Output, Request, TokenLogprob

# The shortest prefill bucket: shorter chunks are padded to it.
MIN_BUCKET = 16


def buckets(prefill_chunk: int) -> tuple[int, ...]:
    """The chunk lengths that compile: powers of two from MIN_BUCKET, and prefill_chunk."""
    sizes = {prefill_chunk}
    size = MIN_BUCKET
    while size < prefill_chunk:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request on its way through the engine."""

    request: Request
    seed: int  # the request's seed, or one drawn for it (uint32)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    # What the next output says: tokens and log-probabilities since the last one, the end.
    new_tokens: list[int] = dataclasses.field(default_factory=list)
    new_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_sent: bool = False
    blocks: list[int] = dataclasses.field(default_factory=list)  # a paged cache's, in order
    cached: int | None = None  # prompt tokens found in the prefix cache (None: not looked up)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt)

    def output(self) -> Output:
        """What happened since the last output, which it then forgets."""
        r = self.request
        prompt = None
        if r.prompt_logprobs is not None and not self.prompt_sent and not self.prefilling:
            prompt, self.prompt_sent = tuple(self.prompt_logprobs), True
        out = Output(
            r.id,
            tuple(self.new_tokens),
            None if r.logprobs is None else tuple(self.new_logprobs),
            prompt,
            self.finish_reason,
            self.error,
        )
        self.new_tokens.clear()
        self.new_logprobs.clear()
        return out

    @property
    def position(self) -> int:
        """The position of the newest generated token, which the next decode step feeds."""
        return len(self.request.prompt) + len(self.generated) - 1


class Chunk(NamedTuple):
    """Prompt tokens [start, start + length) of `sequence`, prefilled in one call."""

    sequence: Sequence
    start: int
    length: int

    @property
    def last(self) -> bool:
        """Whether this chunk ends the prompt (its last logits draw the first token)."""
        return self.start + self.length == len(self.sequence.request.prompt)


class Scheduler:
    """Slots, the queue and this step's work: see the module docstring."""

    def __init__(
        self,
        max_batch: int,
        prefill_chunk: int,
        prefill_rows: int,
        max_queue: int,
        pool: BlockPool | None = None,
    ):
        self.pool = pool
        self.prefill_chunk, self.prefill_rows = prefill_chunk, prefill_rows
        # A call's chunks are padded to one of these lengths (`buckets`), and a call is
        # one prompt's chunk or `prefill_rows` (some rows unused).
        self.buckets = buckets(prefill_chunk)
        self.row_buckets = tuple(sorted({1, prefill_rows}))
        self.max_queue = max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.slots: list[Sequence | None] = [None] * max_batch
        self.running: list[Sequence] = []  # in slots, in admission order

    def full(self, incoming: int) -> bool:
        """Whether `incoming` more requests (not yet in `waiting`) would leave max_queue
        or more waiting once the free slots have taken theirs. Safe to call from another
        thread: the count may lag a step, never by more than one admission."""
        return incoming + len(self.waiting) - self.slots.count(None) >= self.max_queue

    def admit(self) -> list[Sequence]:
        """Waiting sequences moved into free slots, oldest first, each with its blocks
        (the oldest waits, and those behind it, until the pool has them)."""
        admitted = []
        for slot, holder in enumerate(self.slots):
            if holder is None and self.waiting:
                sequence = self.waiting[0]
                if self.pool is not None:
                    r = sequence.request
                    need = self.pool.needed(len(r.prompt), r.max_tokens)
                    if need > self.pool.available:
                        break
                    sequence.blocks = self.pool.take(need)
                self.waiting.popleft()
                sequence.slot, self.slots[slot] = slot, sequence
                self.running.append(sequence)
                admitted.append(sequence)
        return admitted

    def share(self, rows: int) -> int:
        """The longest chunk of each of `rows` prompts prefilled together: the largest
        bucket that keeps the call within `prefill_chunk` tokens (the shortest bucket
        at least)."""
        return max([b for b in self.buckets if rows * b <= self.prefill_chunk] or self.buckets[:1])

    def shape(self, chunks: list[Chunk]) -> tuple[int, int]:
        """The prefill call holding `chunks`: [rows, length], each the smallest bucket."""
        rows = next(b for b in self.row_buckets if b >= len(chunks))
        return rows, next(b for b in self.buckets if b >= max(c.length for c in chunks))

    def shapes(self) -> list[tuple[int, int]]:
        """Every shape `chunks` can give a prefill call (what an engine compiles)."""
        rows = self.row_buckets
        return [(r, b) for r in rows for b in self.buckets if b <= self.share(r)]

    def chunks(self) -> list[Chunk]:
        """This step's prefill: of the calls it could make, the oldest running prompt
        not yet in the cache alone, or the `prefill_rows` oldest, each prompt's next
        chunk of at most its share, the one whose shape is the fullest of real tokens
        (ties: the more tokens)."""
        prefilling = [s for s in self.running if s.prefilling][: self.prefill_rows]
        if not prefilling:
            return []
        chosen = self._choose(prefilling)
        if all(c.sequence.cached is not None for c in chosen):
            return chosen
        for c in chosen:  # first chunks: start after what the prefix cache holds
            self._look_up(c.sequence)
        return self._choose([c.sequence for c in chosen])

    def _look_up(self, sequence: Sequence) -> None:
        if sequence.cached is not None:
            return
        r = sequence.request
        share = self.pool is not None and r.prompt_logprobs is None  # echo computes it all
        sequence.cached = self.pool.share(r.prompt, sequence.blocks, r.kv_namespace) if share else 0
        sequence.prefilled = sequence.cached

    def _choose(self, prefilling: list[Sequence]) -> list[Chunk]:
        options = []
        for n in sorted({1, len(prefilling)}):
            share = self.share(next(b for b in self.row_buckets if b >= n))
            chunks = [
                Chunk(s, s.prefilled, min(len(s.request.prompt) - s.prefilled, share))
                for s in prefilling[:n]
            ]
            rows, length = self.shape(chunks)
            real = sum(c.length for c in chunks)
            options.append((real / (rows * length), real, chunks))
        return max(options, key=lambda o: o[:2])[2]

    def decoding(self) -> list[Sequence]:
        """The running sequences whose prompt is in the cache."""
        return [s for s in self.running if not s.prefilling]

    def remove(self, sequence: Sequence) -> None:
        """Frees `sequence`'s slot, or takes it off the queue."""
        if sequence.slot is None:
            self.waiting.remove(sequence)
            return
        self.slots[sequence.slot] = None
        self.running.remove(sequence)
        sequence.slot = None
        if self.pool is not None:
            self.pool.give(sequence.blocks)
            sequence.blocks = []

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.waiting) if s.request.id == request_id), None)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

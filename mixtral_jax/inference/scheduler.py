"""Continuous batching's bookkeeping: a queue, a fixed number of slots, chunked prefill.

Plain Python, no JAX: the engine asks it each step what to run.

    waiting (FIFO, at most max_queue) --admit--> a free slot --prefill chunks--> decode
    --stop id / max_tokens / cancel--> the slot is free again, for the next step

Each step admits waiting requests into free slots, hands out prefill chunks (at most
`prefill_rows` prompts, oldest first, a chunk of at most `prefill_chunk` tokens each:
a long prompt is prefilled over several steps while the others keep decoding), then
one decode step for every slot whose prompt is in the cache.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from mixtral_jax.inference.requests import Output, Request, TokenLogprob


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

    def __init__(self, max_batch: int, prefill_chunk: int, prefill_rows: int, max_queue: int):
        self.prefill_chunk, self.prefill_rows = prefill_chunk, prefill_rows
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
        """Waiting sequences moved into free slots, oldest first."""
        admitted = []
        for slot, holder in enumerate(self.slots):
            if holder is None and self.waiting:
                sequence = self.waiting.popleft()
                sequence.slot, self.slots[slot] = slot, sequence
                self.running.append(sequence)
                admitted.append(sequence)
        return admitted

    def chunks(self) -> list[Chunk]:
        """This step's prefill: the next chunk of each of the `prefill_rows` oldest
        running prompts not yet in the cache."""
        prefilling = [s for s in self.running if s.prefilling][: self.prefill_rows]
        return [
            Chunk(s, s.prefilled, min(len(s.request.prompt) - s.prefilled, self.prefill_chunk))
            for s in prefilling
        ]

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

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.waiting) if s.request.id == request_id), None)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

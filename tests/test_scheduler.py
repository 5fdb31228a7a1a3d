"""The scheduler's prefill calls: within the step's token budget, padded as little as
their fixed shapes allow, the oldest prompt always in them."""

from __future__ import annotations

import pytest

from mixtral_jax.inference.requests import Request
from mixtral_jax.inference.scheduler import Scheduler, Sequence


def running(*prompt_lengths: int, budget: int = 512, rows: int = 4) -> Scheduler:
    """A scheduler whose slots hold prompts of these lengths, none prefilled yet."""
    scheduler = Scheduler(16, budget, rows, 64)
    for n in prompt_lengths:
        scheduler.waiting.append(Sequence(Request([1] * n, 1), 0))
    scheduler.admit()
    return scheduler


def call(scheduler: Scheduler) -> list[int]:
    return [c.length for c in scheduler.chunks()]


@pytest.mark.parametrize(
    "prompts, expected",
    [
        ((300, 300, 300, 300), [128, 128, 128, 128]),  # four shares fill 4 x 128
        ((500, 40, 30, 20), [500]),  # the oldest alone fills 1 x 512 best
        ((1000,), [512]),  # one prompt: the whole budget
        ((100, 90, 80, 70), [100]),  # 1 x 128 is fuller than 4 x 128
        ((120, 110, 128, 125), [120, 110, 128, 125]),
        ((200, 10), [200]),
    ],
)
def test_a_step_prefills_the_call_that_pads_least(prompts, expected):
    scheduler = running(*prompts)
    assert call(scheduler) == expected
    rows, length = scheduler.shape(scheduler.chunks())
    assert rows * length <= 512 and (rows, length) in scheduler.shapes()


def test_every_prompt_is_prefilled_oldest_first_and_completely():
    """A load of prompts: each call holds the oldest unfinished prompt, stays within
    the budget, has a compiled shape, and every token is prefilled exactly once."""
    prompts = [17, 512, 3, 260, 129, 1000, 64, 65, 300, 31]
    scheduler = running(*prompts, budget=256)
    order = list(scheduler.running)
    seen = [0] * len(prompts)
    while any(s.prefilling for s in scheduler.running):
        chunks = scheduler.chunks()
        oldest = next(s for s in order if s.prefilling)
        assert chunks[0].sequence is oldest
        rows, length = scheduler.shape(chunks)
        assert (rows, length) in scheduler.shapes() and rows * length <= 256
        for chunk in chunks:
            i = order.index(chunk.sequence)
            assert chunk.start == seen[i]
            seen[i] += chunk.length
            chunk.sequence.prefilled += chunk.length
    assert seen == prompts


def test_the_shapes_are_each_rows_buckets_up_to_its_share():
    assert running(budget=512).shapes() == [
        *((1, n) for n in (16, 32, 64, 128, 256, 512)),
        *((4, n) for n in (16, 32, 64, 128)),
    ]
    # A budget too small for four shares of the shortest bucket still gives each 16.
    assert running(budget=16).shapes() == [(1, 16), (4, 16)]
    assert call(running(40, 40, 40, 40, budget=16)) == [16, 16, 16, 16]

"""A paged cache's block bookkeeping: blocks are held and freed exactly, prompts share
the cached blocks of their longest common prefix and never their last token's, and
cached blocks no one holds are evicted least recently used."""

from __future__ import annotations

import pytest

from mixtral_jax.inference.blocks import BlockPool

BS = 4


def pool(num_blocks: int = 8, prefix_caching: bool = True) -> BlockPool:
    return BlockPool(num_blocks, BS, blocks_per_row=6, prefix_caching=prefix_caching)


def prefill(p: BlockPool, prompt: list[int], max_tokens: int = 4) -> list[int]:
    """A request's life up to its prompt in the cache: its blocks, some shared."""
    blocks = p.take(p.needed(len(prompt), max_tokens))
    cached = p.share(prompt, blocks)
    assert cached % BS == 0 and cached < len(prompt)
    p.register(prompt, blocks, len(prompt))
    return blocks


def test_blocks_are_held_by_what_requests_need_and_all_come_back():
    p = pool(prefix_caching=False)
    assert p.needed(5, 3) == 2 and p.needed(5, 4) == 3 and p.needed(30, 30) == 6  # a row: 6
    a, b = p.take(3), p.take(5)
    assert len(set(a + b)) == 8 and p.used == 8 and p.available == 0
    with pytest.raises(ValueError, match="3 blocks asked for, 0 available"):
        p.take(3)
    p.give(a)
    p.give(b)
    assert p.used == 0 and sorted(p.free) == list(range(8))


def test_a_prompt_shares_the_full_blocks_of_its_longest_cached_prefix():
    p = pool(16)
    system = list(range(100, 108))  # two blocks
    first = prefill(p, [*system, 1, 2, 3, 4, 5])  # blocks 0-2 of its prompt are full
    second = p.take(p.needed(11, 4))
    assert p.share([*system, 9, 9, 9], second) == 8
    assert second[:2] == first[:2] and second[2] not in first
    assert p.holders[first[0]] == 2
    # The same tokens after a different first block are another prefix: no hit.
    assert p.share([7, 7, 7, 7, *system[4:], 1], p.take(3)) == 0
    assert p.hit_tokens == 8 and p.lookup_tokens == 13 + 11 + 9


def test_the_last_prompt_token_is_never_shared():
    """A prompt of exactly two cached blocks shares one: its last token's block is
    computed again, as its logits draw the first answer token."""
    p = pool()
    prompt = list(range(8))
    prefill(p, prompt)
    assert p.share(prompt, p.take(3)) == 4
    assert p.share(prompt[:5], p.take(3)) == 4


def test_cached_blocks_outlive_their_holders_and_are_evicted_least_recently_used():
    p = pool(6)
    a = prefill(p, [1] * 9, max_tokens=3)  # 3 blocks: two full ones registered
    b = prefill(p, [2] * 5, max_tokens=3)  # 2 blocks: one registered
    p.give(a)
    p.give(b)
    assert p.used == 0 and p.available == 6 and len(p.idle) == 3
    p.take(3)  # the three blocks never registered (a's last, b's last, the spare) ...
    p.take(1)  # ... then the least recently used cached one: a's first
    assert a[0] not in p.hash_of and a[1] in p.hash_of and b[0] in p.hash_of
    assert p.share([1] * 9, p.take(0) + [99, 99, 99]) == 0  # a's chain starts at a[0]
    assert p.share([2] * 5, [p.take(1)[0], 98]) == 4  # b's block, still cached


def test_without_prefix_caching_nothing_is_shared():
    p = pool(prefix_caching=False)
    prefill(p, list(range(9)))
    assert p.share(list(range(9)), p.take(3)) == 0 and p.lookup_tokens == 0


def test_a_lost_cache_forgets_every_prefix_and_frees_every_block():
    p = pool(8)
    held = prefill(p, [3] * 9)  # two full blocks registered, held
    p.give(prefill(p, [4] * 9))  # two more registered, no longer held
    p.forget()
    assert not p.by_hash and not p.idle and p.available == 8 - len(held)
    p.give(held)
    assert sorted(p.free) == list(range(8))
    assert p.share([3] * 9, p.take(3)) == 0

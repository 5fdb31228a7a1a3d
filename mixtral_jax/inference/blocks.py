"""A paged KV cache's blocks, on the host: who holds which, and the prefix cache.

Plain Python, no JAX. A request is given, when admitted, the blocks its prompt and
`max_tokens` can fill (`needed`), and gives them back when it ends. With prefix
caching, each full block of a prompt is known by a hash of every token up to its end
(a chain: block i's hash covers blocks 0..i). Once such a block is in the cache, a
later prompt with the same tokens up to there shares it instead of computing it
again: reference counted while held, and kept after its last holder ends, to be
evicted least recently used when fresh blocks run out.

Shared blocks are never written: a prompt shares at most the full blocks before its
last token (that token's logits draw the first answer token, so it is always
computed), and its holder writes only past its prompt's last full block.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


class BlockPool:
    """`num_blocks` blocks of `block_size` slots; a row of the cache has
    `blocks_per_row`. With `prefix_caching`, full prompt blocks are shared (above)."""

    def __init__(
        self, num_blocks: int, block_size: int, blocks_per_row: int, prefix_caching: bool = False
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks_per_row, self.prefix_caching = blocks_per_row, prefix_caching
        self.free = collections.deque(range(num_blocks))  # holding nothing
        self.holders = [0] * num_blocks
        # Prefix cache: a block's hash both ways; blocks no one holds, oldest use first.
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Prompt tokens looked up in the prefix cache, and those found.
        self.lookup_tokens = self.hit_tokens = 0

    def needed(self, prompt_tokens: int, max_tokens: int) -> int:
        """Blocks for the slots a request can fill: its prompt and answer, or a row's
        whole rolling buffer if that is fewer."""
        tokens = min(prompt_tokens + max_tokens, self.blocks_per_row * self.block_size)
        return -(-tokens // self.block_size)

    @property
    def available(self) -> int:
        """Blocks `take` can hand out: free ones, and cached ones no one holds."""
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        """Blocks held by requests."""
        return self.num_blocks - self.available

    def take(self, n: int) -> list[int]:
        """`n` blocks for one holder: free ones first, then the least recently used
        cached ones (forgotten by the prefix cache)."""
        if n > self.available:
            raise ValueError(f"{n} blocks asked for, {self.available} available")
        blocks = []
        for _ in range(n):
            if self.free:
                block = self.free.popleft()
            else:
                block, _ = self.idle.popitem(last=False)
                del self.by_hash[self.hash_of.pop(block)]
            self.holders[block] = 1
            blocks.append(block)
        return blocks

    def give(self, blocks: list[int]) -> None:
        """One holder's blocks back: each is free once no one holds it (kept for the
        prefix cache if it is in it)."""
        for block in blocks:
            self.holders[block] -= 1
            if self.holders[block] == 0:
                if block in self.hash_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)

    def hashes(self, prompt: list[int], namespace: bytes = b"") -> list[bytes]:
        """The chain hash of each full block of `prompt` (its chain starting from
        `namespace`: what else decides the blocks' keys, e.g. a LoRA adapter)."""
        bs, out, h = self.block_size, [], namespace
        tokens = np.asarray(prompt, np.int64)
        for i in range(len(prompt) // bs):
            h = hashlib.blake2b(
                h + tokens[i * bs : (i + 1) * bs].tobytes(), digest_size=16
            ).digest()
            out.append(h)
        return out

    def share(self, prompt: list[int], blocks: list[int], namespace: bytes = b"") -> int:
        """The cached blocks of `prompt`'s longest cached prefix put in place of the
        first of `blocks` (a holder's own, fresh; those replaced are freed). Returns the
        prompt tokens they hold, which need no computing."""
        if not self.prefix_caching:
            return 0
        usable = (len(prompt) - 1) // self.block_size  # the last token is always computed
        self.lookup_tokens += len(prompt)
        shared = 0
        for h in self.hashes(prompt[: usable * self.block_size], namespace):
            block = self.by_hash.get(h)
            if block is None:
                break
            self.give([blocks[shared]])
            self.idle.pop(block, None)
            self.holders[block] += 1
            blocks[shared] = block
            shared += 1
        self.hit_tokens += shared * self.block_size
        return shared * self.block_size

    def register(
        self, prompt: list[int], blocks: list[int], prefilled: int, namespace: bytes = b""
    ) -> None:
        """The prompt's full blocks among its first `prefilled` tokens, now in the cache,
        made known to later prompts (a block already known, or another block holding
        the same tokens, is left as it is)."""
        if not self.prefix_caching:
            return
        full = min(prefilled, len(prompt)) // self.block_size
        hashes = self.hashes(prompt[: full * self.block_size], namespace)
        for h, block in zip(hashes, blocks, strict=False):
            if h not in self.by_hash and block not in self.hash_of:
                self.by_hash[h], self.hash_of[block] = block, h

    def forget(self) -> None:
        """Empties the prefix cache, as when the cache's contents are lost: blocks no one
        holds are free, and held ones will be when given back."""
        self.free.extend(self.idle)
        self.idle.clear()
        self.by_hash.clear()
        self.hash_of.clear()

    @property
    def hit_rate(self) -> float:
        """Of the prompt tokens looked up in the prefix cache, the share it held."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

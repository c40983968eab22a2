"""Which prompt blocks the prefix store holds: keys chained over the tokens, least-recently-used eviction.

A prompt's full blocks of `block_size` tokens each get a key that hashes the
block's tokens, the key of the block before it (so it stands for every token
up to the block's end) and a namespace (the adapter the keys and values were
computed through: "" for the plain base, a key unique to each load of an
adapter). Two prompts with the same key at block i have the same first
(i + 1) x block_size tokens under the same weights, so the keys and values a
row computed for those positions serve the other row as they are: the cache
columns are positions (`gptj.inference.runner`).

This module is the host-side index only (which store block holds which key,
in what order they were used); the engine (`gptj.inference.engine`) decides
when to look up and save, and the runner copies the blocks on the device.

Eviction is least recently used, and a chain is evicted from its end: a hit
or a save marks a chain's blocks used from the last to the first, so the
first block of a chain is always the last of it to go (a later block without
its predecessors could never be found).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import jax.numpy as jnp
import numpy as np

GIB = 2**30
# The store never holds more than this many rows' worth of blocks (a small model's budget would otherwise be
# mostly memory no prefix could use up).
STORE_ROWS = 64


def prefix_block_bytes(config, block_size: int) -> int:
    """Bytes of one store block of a model (`GPTJConfig`): keys and values of `block_size` positions, every
    layer, in the compute dtype."""
    return 2 * config.num_layers * config.num_heads * block_size * config.head_dim * jnp.dtype(config.dtype).itemsize


def store_blocks(gib: float, block_bytes: int, row_blocks: int) -> int:
    """How many blocks a store of `gib` GiB holds (at most STORE_ROWS rows of `row_blocks` blocks); 0: none."""
    return min(int(gib * GIB) // block_bytes, STORE_ROWS * row_blocks)


def block_keys(tokens: Sequence[int], block_size: int, namespace: str = "") -> list[bytes]:
    """The chained key of each full block of `tokens` (a trailing partial block has none)."""
    keys, parent = [], namespace.encode()
    ids = np.asarray(tokens, np.int32)
    for end in range(block_size, len(ids) + 1, block_size):
        parent = hashlib.blake2b(parent + b"|" + ids[end - block_size:end].tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixIndex:
    """Store blocks by key, least recently used first; thread-unsafe (the engine's thread owns it).

    Args:
      blocks: how many blocks the store holds.
      block_size: tokens per block.
    """

    def __init__(self, blocks: int, block_size: int):
        if blocks < 1 or block_size < 1:
            raise ValueError(f"a prefix index needs blocks >= 1 and block_size >= 1, got {blocks} and {block_size}")
        self.blocks, self.block_size = int(blocks), int(block_size)
        self._where: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # least recently used first
        self._namespace: dict[bytes, str] = {}
        self._free = list(range(self.blocks - 1, -1, -1))
        self.evictions = 0

    @property
    def used(self) -> int:
        """Store blocks holding a key."""
        return len(self._where)

    def _touch(self, keys: Sequence[bytes]) -> None:
        """Marks a chain's keys used, the first one last (so it is evicted last)."""
        for key in reversed(keys):
            self._where.move_to_end(key)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The store blocks of the longest run of `keys` held, from the first; marks them used."""
        found = []
        for key in keys:
            block = self._where.get(key)
            if block is None:
                break
            found.append(block)
        self._touch(keys[:len(found)])
        return found

    def holds(self, key: bytes) -> bool:
        return key in self._where

    def add(self, keys: Sequence[bytes], namespace: str = "") -> list[int | None]:
        """A store block for each of a chain's `keys` (in order) to save into, or None where the key is held
        already or no block can be freed; evicts the least recently used keys not in this chain."""
        placed: list[int | None] = []
        chain = set(keys)
        for key in keys:
            if key in self._where:
                placed.append(None)
                continue
            block = self._free.pop() if self._free else self._evict(chain)
            if block is None:
                placed.append(None)
                continue
            self._where[key] = block
            self._namespace[key] = namespace
            placed.append(block)
        self._touch([k for k in keys if k in self._where])
        return placed

    def _evict(self, keep: set[bytes]) -> int | None:
        for key in self._where:
            if key not in keep:
                self.evictions += 1
                self._namespace.pop(key)
                return self._where.pop(key)
        return None

    def drop(self, namespace: str) -> int:
        """Forgets every key of `namespace` (an adapter unloaded); returns how many blocks were freed."""
        gone = [key for key, space in self._namespace.items() if space == namespace]
        for key in gone:
            self._free.append(self._where.pop(key))
            self._namespace.pop(key)
        return len(gone)

    def clear(self) -> None:
        """Forgets every key (the store's contents are gone)."""
        self._where.clear()
        self._namespace.clear()
        self._free = list(range(self.blocks - 1, -1, -1))

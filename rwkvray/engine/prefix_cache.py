"""The prefix-state cache: for an RNN the state after a prefix is all a later request needs to skip it.

Entries are taken at prompt chunk boundaries (every `block` tokens) and keyed by (state id@version, prefix
length, hash of the prefix tokens). Each holds the recurrent state of one row and the logits after the
prefix's last token, so a prompt that IS a cached prefix needs no forward at all. The cache is capped by bytes
and evicts the least recently used entry first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from rwkvray.model.rwkv import RNNState


@dataclass
class CachedPrefix:
    state: RNNState        # one row: [L,1,C], [L,1,H,N,N], [L,1,C]
    logits: torch.Tensor   # [V] after the prefix's last token

    @property
    def nbytes(self) -> int:
        tensors = (self.state.att_shift, self.state.wkv, self.state.ffn_shift, self.logits)
        return sum(t.numel() * t.element_size() for t in tensors)


def prefix_digests(tokens: list[int], block: int) -> list[tuple[int, str]]:
    """(length, digest) of every prefix of `tokens` whose length is a positive multiple of `block`."""
    hasher, out = hashlib.blake2b(digest_size=16), []
    for end in range(block, len(tokens) + 1, block):
        hasher.update(array("l", tokens[end - block:end]).tobytes())
        out.append((end, hasher.hexdigest()))
    return out


class PrefixCache:
    def __init__(self, max_bytes: int, block: int):
        self.max_bytes = max_bytes
        self.block = block
        self.entries: OrderedDict[tuple, CachedPrefix] = OrderedDict()
        self.bytes = 0

    def longest(self, state_key: str, digests: list[tuple[int, str]]) -> tuple[int, CachedPrefix | None]:
        """The longest cached prefix among a prompt's `prefix_digests`: (its length, the entry), or (0, None)."""
        for length, digest in reversed(digests):
            entry = self.entries.get((state_key, length, digest))
            if entry is not None:
                self.entries.move_to_end((state_key, length, digest))
                return length, entry
        return 0, None

    def put(self, state_key: str, length: int, digest: str, entry: CachedPrefix) -> None:
        """Keep `entry` as the state after the prefix (length, digest); least recently used entries make room."""
        key = (state_key, length, digest)
        if key in self.entries or entry.nbytes > self.max_bytes:
            return
        self.entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes

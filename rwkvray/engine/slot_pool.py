"""The engine's state slots: one preallocated RNNState of `max_rows` rows; a request's row lives in one slot."""
from __future__ import annotations

import heapq
from typing import Optional

import torch

from rwkvray.model.rwkv import RNNState, RWKV
from rwkvray.model.tuned_state import TunedState
from rwkvray.engine.prefix_cache import CachedPrefix


def state_rows(state: RNNState, index) -> RNNState:
    """Some rows of a batched state (a view for a slice, a copy for an index tensor)."""
    return RNNState(state.att_shift[:, index], state.wkv[:, index], state.ffn_shift[:, index])


class SlotPool:
    """max_rows preallocated state slots and their next-token logits, on the model's device."""

    def __init__(self, model: RWKV, max_rows: int):
        weight = model.emb.weight
        self.state = RNNState.zeros(model.dims, max_rows, weight.device, weight.dtype)
        self.logits = torch.zeros(max_rows, model.dims.vocab_size, device=weight.device)
        self.free = list(range(max_rows))  # a heap: rows take the lowest, so a batch's slots tend to be consecutive

    def take(self) -> int:
        return heapq.heappop(self.free)

    def give_back(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def index(self, slots: list[int]):
        """A slice when the slots are consecutive (a view, no copy), else an index tensor."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.logits.device)

    def read(self, slots: list[int]) -> RNNState:
        return state_rows(self.state, self.index(slots))

    def write(self, slots: list[int], state: RNNState) -> None:
        at = self.index(slots)
        if at == slice(0, len(self.logits)):  # every slot: keep the new tensors instead of copying them in
            self.state = RNNState(*(getattr(state, name).to(getattr(self.state, name).dtype).contiguous()
                                    for name in ("att_shift", "wkv", "ffn_shift")))
            return
        for name in ("att_shift", "wkv", "ffn_shift"):
            getattr(self.state, name)[:, at] = getattr(state, name).to(getattr(self.state, name).dtype)

    def start(self, slot: int, tuned: Optional[TunedState]) -> None:
        """A row's initial state: the tuned state (copied, never aliased; its shift starts too, if it has them)
        or zeros."""
        if tuned is None:
            for part in (self.state.att_shift, self.state.wkv, self.state.ffn_shift):
                part[:, slot] = 0
        else:
            tuned.start_row(self.state, slot)

    def restore(self, slot: int, entry: CachedPrefix) -> None:
        self.write([slot], entry.state)
        self.logits[slot] = entry.logits

    def snapshot(self, slot: int) -> RNNState:
        row = state_rows(self.state, slice(slot, slot + 1))
        return RNNState(row.att_shift.clone(), row.wkv.clone(), row.ffn_shift.clone())

"""A tuned initial state: what state tuning trains and what a state file holds.

Plain state tuning (RWKV-PEFT's `--train_type state`) trains the WKV state [L,H,N,N] only; the token shifts start
at zero, as RWKV-Runner and the `rwkv` package start them. Fullstate tuning (`--train_type fullstate`, spec
`peft.state.shift: true`) also trains where the token shifts start: one [C] vector per layer for the time-mix (att)
and one for the channel-mix (ffn). RWKV-PEFT adds that vector (`ts_state`) to the first position's shift difference,
`(0 - x_0) + ts_state`, which is the token shift started from `last_x = ts_state`: in the `rwkv` package's state
list per layer, [att x_prev, att kv, ffn x_prev], the three tensors sit exactly there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rwkvray.model.rwkv import RNNState


@dataclass(frozen=True)
class TunedState:
    time_state: torch.Tensor                 # [L,H,N,N] fp32, [value, key] layout
    att_shift: torch.Tensor | None = None    # [L,C] fp32: the time-mix's token shift starts here (fullstate only)
    ffn_shift: torch.Tensor | None = None    # [L,C] fp32: the channel-mix's

    def __post_init__(self):
        if (self.att_shift is None) != (self.ffn_shift is None):
            raise ValueError("a tuned state has both token-shift starts or neither")

    @property
    def has_shift(self) -> bool:
        return self.att_shift is not None

    def to(self, device) -> TunedState:
        move = (lambda t: None if t is None else t.to(device))
        return TunedState(move(self.time_state), move(self.att_shift), move(self.ffn_shift))

    def start_row(self, state: RNNState, row) -> None:
        """Set row(s) `row` of a batched RNNState to this initial state (copied, never aliased)."""
        state.wkv[:, row] = self.time_state
        state.att_shift[:, row] = 0 if self.att_shift is None else self.att_shift
        state.ffn_shift[:, row] = 0 if self.ffn_shift is None else self.ffn_shift

    def is_finite(self) -> bool:
        return all(torch.isfinite(t).all() for t in (self.time_state, self.att_shift, self.ffn_shift) if t is not None)


def blend(parts: list[tuple[float, TunedState]]) -> TunedState:
    """The weighted sum of states, each tensor with the same weights; a plain state's shift starts count as the
    zeros they are, so a blend with any fullstate part is a fullstate."""
    time_state = sum(weight * state.time_state.float() for weight, state in parts)
    if not any(state.has_shift for _, state in parts):
        return TunedState(time_state)
    L, C = parts[0][1].time_state.shape[0], next(state.att_shift.shape[1] for _, state in parts if state.has_shift)

    def mixed(name: str) -> torch.Tensor:
        out = torch.zeros(L, C)
        for weight, state in parts:
            if state.has_shift:
                out = out + weight * getattr(state, name).float()
        return out
    return TunedState(time_state, mixed("att_shift"), mixed("ffn_shift"))

"""State tuning: the per-layer initial WKV state [L,H,N,N] is the trainable tensor; with `peft.state.shift`
(RWKV-PEFT's fullstate) so are where the token shifts of time-mix and channel-mix start, [L,C] each."""
import torch
import torch.nn as nn

from rwkvray.model.rwkv import RNNState, RWKV
from rwkvray.model.state_file import load_state, save_state, state_tensors
from rwkvray.model.tuned_state import TunedState
from rwkvray.peft.base import PeftMethod
from rwkvray.errors import UserError


def from_time_state(time_state: torch.Tensor, batch: int, n_embd: int, dtype=torch.float32) -> RNNState:
    """A tuned initial WKV state [L,H,N,N] for every row (broadcast, not copied, so its gradient sums over the
    rows); shift states start at zero, as RWKV-Runner does."""
    L = time_state.shape[0]
    shift = torch.zeros(L, batch, n_embd, device=time_state.device, dtype=dtype)
    wkv = time_state.float().unsqueeze(1).expand(L, batch, *time_state.shape[1:])
    return RNNState(shift, wkv, shift.clone())


def broadcast_state(state: TunedState, batch: int, n_embd: int, dtype=torch.float32) -> RNNState:
    """from_time_state, with the shifts starting from the tuned [L,C] starts when the state has them."""
    rows = from_time_state(state.time_state, batch, n_embd, dtype)
    if not state.has_shift:
        return rows
    L = state.time_state.shape[0]
    att, ffn = (s.to(dtype).unsqueeze(1).expand(L, batch, n_embd) for s in (state.att_shift, state.ffn_shift))
    return RNNState(att, rows.wkv, ffn)


class StateTuning(PeftMethod):
    name = "state"

    def __init__(self, start: TunedState, **file_options):
        """start: the initial values; with shift starts (even zeros) they are trained too."""
        super().__init__(**file_options)
        self.time_state = nn.Parameter(start.time_state.float().clone())  # fp32 masters, whatever the base dtype
        if start.has_shift:
            self.att_shift = nn.Parameter(start.att_shift.float().clone())
            self.ffn_shift = nn.Parameter(start.ffn_shift.float().clone())
        else:
            self.att_shift = self.ffn_shift = None

    @classmethod
    def from_spec(cls, base: RWKV, peft_spec, **file_options) -> "StateTuning":
        dims, spec = base.dims, peft_spec.state
        if spec.init_from:
            start = load_state(spec.init_from, dims)
            if start.has_shift and not spec.shift:
                raise UserError(f"peft.state.init_from: {spec.init_from}: holds token-shift starts (ts_state) "
                                "that plain state tuning would drop: set peft.state.shift: true "
                                "(--train_type fullstate)")
        else:
            start = TunedState(torch.zeros(dims.n_layer, *dims.state_shape))
        if spec.shift and not start.has_shift:
            zeros = torch.zeros(dims.n_layer, dims.n_embd)
            start = TunedState(start.time_state, zeros, zeros.clone())
        return cls(start, **file_options)

    def attach(self, base: RWKV) -> None:
        self.to(base.emb.weight.device)

    def tuned(self) -> TunedState:
        return TunedState(self.time_state, self.att_shift, self.ffn_shift)

    def initial_state(self, model: RWKV, batch: int, dtype: torch.dtype) -> RNNState:
        return broadcast_state(self.tuned(), batch, model.dims.n_embd, dtype)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The state file's tensors, fp32: blocks.{i}.att.time_state (and blocks.{i}.att/ffn.ts_state)."""
        return state_tensors(self.tuned())

    def save(self, path: str) -> None:
        save_state(self.tuned(), path)

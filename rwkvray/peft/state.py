"""State tuning: the per-layer initial WKV state [L,H,N,N] is the only trainable tensor."""
import torch
import torch.nn as nn

from rwkvray.model.checkpoint import TIME_STATE_KEY
from rwkvray.model.rwkv import RNNState, RWKV
from rwkvray.peft.base import PeftMethod
from rwkvray.model.state_file import load_state, save_state


def from_time_state(time_state: torch.Tensor, batch: int, n_embd: int, dtype=torch.float32) -> RNNState:
    """A tuned initial state [L,H,N,N] for every row (broadcast, not copied, so its gradient sums over the rows);
    shift states start at zero, as RWKV-Runner does."""
    L = time_state.shape[0]
    shift = torch.zeros(L, batch, n_embd, device=time_state.device, dtype=dtype)
    wkv = time_state.float().unsqueeze(1).expand(L, batch, *time_state.shape[1:])
    return RNNState(shift, wkv, shift.clone())


class StateTuning(PeftMethod):
    name = "state"

    def __init__(self, time_state: torch.Tensor, **file_options):
        super().__init__(**file_options)
        self.time_state = nn.Parameter(time_state.float().clone())  # fp32 master, whatever the base dtype

    @classmethod
    def from_spec(cls, base: RWKV, peft_spec, **file_options) -> "StateTuning":
        init_from = peft_spec.state.init_from if peft_spec.state else None
        if init_from:
            return cls(load_state(init_from, base.dims), **file_options)
        return cls(torch.zeros(base.dims.n_layer, *base.dims.state_shape), **file_options)

    def attach(self, base: RWKV) -> None:
        self.to(base.emb.weight.device)

    def initial_state(self, model: RWKV, batch: int, dtype: torch.dtype) -> RNNState:
        return from_time_state(self.time_state, batch, model.dims.n_embd, dtype)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The state file's tensors: blocks.{i}.att.time_state, fp32."""
        layers = self.time_state.detach().float().cpu()
        return {TIME_STATE_KEY.format(i): layer.clone() for i, layer in enumerate(layers)}

    def save(self, path: str) -> None:
        save_state(self.time_state.detach().float().cpu(), path)

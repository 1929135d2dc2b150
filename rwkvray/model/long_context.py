"""Long documents in chunks (`--train_type infctx`): the sequence runs `chunk_ctx` tokens at a time and the RNN
state (both token shifts and the WKV state) passes from chunk to chunk, so memory is bounded by the chunk, not
by the document.

Each chunk is recomputed in backward (a checkpoint whose inputs are the chunk's tokens and the state it starts
from), and by default the gradient flows back through every chunk boundary to the initial state: a tuned state
learns from the whole document. `detach_between=True` is RWKV-PEFT's infctx instead: the state is detached
between chunks, so only the first chunk reaches the initial state. The loss is the same token-weighted mean as
the unchunked `masked_lm_loss`.
"""
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rwkvray.model.loss import masked_lm_loss_sum
from rwkvray.model.rwkv import RNNState, RWKV


@dataclass(frozen=True)
class Chunking:
    chunk_ctx: int               # tokens per chunk
    detach_between: bool = False  # RWKV-PEFT's infctx: no gradient across chunk boundaries


def _chunk_loss_and_state(model: RWKV, idx, targets, mask, att_shift, wkv, ffn_shift):
    """One chunk from the given state: its summed loss and the state after its last token."""
    hidden, state = model.hidden(idx, RNNState(att_shift, wkv, ffn_shift))
    return masked_lm_loss_sum(hidden, model.head, targets, mask), state.att_shift, state.wkv, state.ffn_shift


def chunked_lm_loss(model: RWKV, input_ids, targets, mask, state: RNNState | None, chunking: Chunking):
    """The masked mean loss of `masked_lm_loss(model.features(input_ids, state), ...)`, computed chunk by chunk."""
    if state is None:
        state = RNNState.zeros(model.dims, input_ids.shape[0], input_ids.device, model.emb.weight.dtype)
    carried = (state.att_shift, state.wkv, state.ffn_shift)
    total = None
    for start in range(0, input_ids.shape[1], chunking.chunk_ctx):
        part = slice(start, start + chunking.chunk_ctx)
        args = (model, input_ids[:, part], targets[:, part], mask[:, part], *carried)
        if torch.is_grad_enabled():
            loss_sum, *carried = checkpoint(_chunk_loss_and_state, *args, use_reentrant=False)
        else:
            loss_sum, *carried = _chunk_loss_and_state(*args)
        if chunking.detach_between:
            carried = [t.detach() for t in carried]
        total = loss_sum if total is None else total + loss_sum
    return total / mask.float().sum().clamp(min=1)

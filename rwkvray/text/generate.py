"""RNN-mode generation: prefill the prompt from a (tuned) state, then sample one token at a time.

The Serve engine reuses `sample` for its batched decode loop.
"""
from collections.abc import Iterator

import torch

from rwkvray.model.rwkv import RNNState, RWKV
from rwkvray.model.tuned_state import TunedState
from rwkvray.text.tokenizer import EOS_ID

PREFILL_CHUNK = 1024  # long prompts go through the parallel path in pieces, bounding memory


@torch.no_grad()
def prefill(model: RWKV, tokens: list[int], state: RNNState) -> tuple[torch.Tensor, RNNState]:
    """Run the prompt in parallel mode; returns the logits of its last token [V] and the state after it."""
    device = model.emb.weight.device
    logits = None
    for start in range(0, len(tokens), PREFILL_CHUNK):
        idx = torch.tensor([tokens[start:start + PREFILL_CHUNK]], device=device)
        hidden, state = model.hidden(idx, state)
        logits = model.head(hidden[:, -1])[0]
    return logits.float(), state


NUCLEUS_FIRST_K = 64  # candidates looked at first for top-p; widened only when they hold too little mass


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of logits [B,V], on the logits' device. Rows with temperature 0 are greedy; top_p keeps
    the smallest nucleus. No full sort: the nucleus comes from a top-k that widens until it holds top_p, and
    the draw is an exponential race (argmax of p / E with E ~ Exp(1)), which picks token i with probability p_i."""
    greedy = logits.argmax(-1)
    temperature = temperature.to(logits.device)
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-6).unsqueeze(-1), -1)
    probs = nucleus(probs, top_p.to(logits.device))
    race = torch.empty_like(probs).exponential_(generator=generator)
    sampled = (probs / race).argmax(-1)
    return torch.where(temperature <= 1e-6, greedy, sampled)


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the top_p nucleus: a token stays while the mass ranked above it is <= top_p."""
    cut = top_p < 1
    if not cut.any():
        return probs
    rows, p = probs[cut], top_p[cut].unsqueeze(-1)
    k = min(NUCLEUS_FIRST_K, rows.shape[-1])
    while True:
        top = rows.topk(k, -1).values
        above = top.cumsum(-1) - top
        if k == rows.shape[-1] or bool((above[:, -1] > p.squeeze(-1)).all()):
            break
        k = min(rows.shape[-1], k * 8)
    kept = (above <= p).sum(-1, keepdim=True)
    smallest_kept = top.gather(-1, kept - 1)
    out = probs.clone()
    out[cut] = rows.masked_fill(rows < smallest_kept, 0.0)
    return out


def start_state(model: RWKV, tuned: TunedState | None) -> RNNState:
    """Zeros, or the tuned state (its shift starts too, when it has them)."""
    state = RNNState.zeros(model.dims, 1, model.emb.weight.device, model.emb.weight.dtype)
    if tuned is not None:
        tuned.start_row(state, 0)
    return state


@torch.no_grad()
def generate_tokens(model: RWKV, prompt: list[int], tuned: TunedState | None = None, max_tokens: int = 100,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
    """Yields generated token ids; stops at end of text (EOS_ID) or after max_tokens."""
    generator = torch.Generator(device=model.emb.weight.device).manual_seed(seed)
    logits, state = prefill(model, prompt, start_state(model, tuned))
    temp, nucleus = torch.tensor([temperature]), torch.tensor([top_p])
    for _ in range(max_tokens):
        token = sample(logits.unsqueeze(0), temp, nucleus, generator)
        if token.item() == EOS_ID:
            return
        yield token.item()
        logits, state = model.step(token, state)
        logits = logits[0].float()

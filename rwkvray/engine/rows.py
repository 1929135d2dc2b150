"""One request in the engine: its prompt, sampling settings, progress, text decoding and output queue."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from rwkvray.model.tuned_state import TunedState
from rwkvray.text.tokenizer import EOS_ID, StreamDecoder, Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None  # a seeded row samples from its own generator: the same text whatever it is batched with


@dataclass
class Chunk:
    """A piece of a row's output; the last one has finish_reason "stop" or "length"."""
    text: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int


class StopScanner:
    """Cuts the text at the first stop string, holding back any tail that could still grow into one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit, and whether a stop string was hit."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held) + 1))
                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Row:
    """A request's life in the engine: waiting, then prefilling in its slot, then decoding, then done.

    `prefilled` counts the prompt tokens already folded into the slot's state; the row decodes once all are
    (its slot's logits then predict its next token)."""

    def __init__(self, prompt: list[int], tuned: Optional[TunedState], params: SamplingParams,
                 tokenizer: Tokenizer, state_key: Optional[str], device: torch.device):
        self.prompt = prompt
        self.tuned = tuned
        self.state_key = state_key  # the prefix cache's name for the tuned state; None: not cached
        self.params = params
        self.decoder = StreamDecoder(tokenizer)
        self.scanner = StopScanner(params.stop)
        self.generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        self.slot: Optional[int] = None
        self.prefilled = 0
        self.digests: list[tuple[int, str]] = []  # (length, hash) of the prompt's cacheable prefixes
        self.start_entry = None  # the cached prefix this row starts from, if any
        self.generated = 0
        self.sampled = 0  # tokens sampled for this row by the engine's worker
        self.sampled_last = False  # the worker sampled the row's last token: no more steps for it
        self.cancelled = False
        self.arrived = time.monotonic()
        self.last_token_at: Optional[float] = None
        self.out: asyncio.Queue = asyncio.Queue()
        self.ended = asyncio.Event()  # its last chunk (or an error) is in `out`

    @property
    def done(self) -> bool:
        return self.ended.is_set()

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.prefilled == len(self.prompt)

    def count_sample(self, token: int) -> bool:
        """The engine's worker sampled `token` for this row: whether the row goes on after it (a stop string may
        still end it earlier). Counted apart from `generated`, which the loop advances while the worker runs."""
        self.sampled += 1
        self.sampled_last = token == EOS_ID or self.sampled >= self.params.max_tokens
        return not self.sampled_last

    def emit(self, text: str, finish_reason: Optional[str] = None) -> None:
        if text or finish_reason:
            self.out.put_nowait(Chunk(text, finish_reason, len(self.prompt), self.generated))
        if finish_reason:
            self.ended.set()

    def take(self, token: int) -> None:
        """Account for one sampled token and emit what it completes; marks the row done when it finishes."""
        if token == EOS_ID:
            self.finish("stop")
            return
        self.generated += 1
        text, stopped = self.scanner.push(self.decoder.feed(token))
        if stopped:
            self.emit(text, "stop")
        elif self.generated >= self.params.max_tokens:
            self.emit(text)
            self.finish("length")
        else:
            self.emit(text)

    def finish(self, reason: str) -> None:
        text, stopped = self.scanner.push(self.decoder.flush())
        self.emit(text + ("" if stopped else self.scanner.flush()), "stop" if stopped else reason)

    def fail(self, error: BaseException) -> None:
        self.out.put_nowait(error)
        self.ended.set()

    async def ended_or_after(self, seconds: float) -> None:
        """Wait `seconds`, or less if the row ends meanwhile: a held chunk then goes out with the last one at
        once, not up to a stream interval later."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0)):
                await self.ended.wait()

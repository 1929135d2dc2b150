"""Continuous batching with mixed states: rows that start from DIFFERENT tuned states decode together.

A state is only L x [H,N,N] floats (plus two shift vectors per layer), so each row simply carries its own
RNNState: the batch state is the rows' states concatenated along the batch dim, and one `model.step` per token
advances every row whatever state it started from. The batch state is rebuilt only when rows join or leave.

Rows join between steps (each new prompt is prefilled on its own, from a private copy of its state) and leave
as soon as they finish (end-of-text, a stop string, max_tokens, or the client went away). All torch work runs
in one worker thread so the replica's event loop keeps accepting requests while the model computes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import torch

from rwkvray.generate import prefill, sample, start_state
from rwkvray.model import RNNState, RWKV7
from rwkvray.tokenizer import StreamDecoder, Tokenizer

EOS_ID = 0


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
    """One request in the batch: its prompt, sampling settings, text decoding and output queue."""

    def __init__(self, prompt: list[int], time_state: Optional[torch.Tensor], params: SamplingParams,
                 tokenizer: Tokenizer):
        self.prompt = prompt
        self.time_state = time_state
        self.params = params
        self.decoder = StreamDecoder(tokenizer)
        self.scanner = StopScanner(params.stop)
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        self.generated = 0
        self.cancelled = False
        self.done = False
        self.out: asyncio.Queue = asyncio.Queue()

    def emit(self, text: str, finish_reason: Optional[str] = None) -> None:
        if text or finish_reason:
            self.out.put_nowait(Chunk(text, finish_reason, len(self.prompt), self.generated))
        if finish_reason:
            self.done = True

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
        self.done = True
        self.out.put_nowait(error)


class BatchEngine:
    """Owns the batch of active rows of one replica; `generate` is the only entry point."""

    def __init__(self, model: RWKV7, tokenizer: Tokenizer, max_batch_size: int, batch_wait_s: float = 0.0,
                 seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.generator = torch.Generator().manual_seed(seed)  # sampling runs on the CPU
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkv-engine")
        self.waiting: deque[Row] = deque()
        self.active: list[Row] = []
        self.state: Optional[RNNState] = None   # the active rows' states, in row order
        self.logits: Optional[torch.Tensor] = None  # [B,V] next-token logits of the active rows
        self.wake = asyncio.Event()
        self.loop_task: Optional[asyncio.Task] = None
        self.steps = 0  # batched decode steps so far (for tests and stats)
        self.mixed_steps = 0  # steps whose rows started from more than one state
        self.max_rows_seen = 0

    async def generate(self, prompt: list[int], time_state: Optional[torch.Tensor],
                       params: SamplingParams) -> AsyncIterator[Chunk]:
        """Stream one request's chunks. time_state None starts from zeros; the tensor itself is never written."""
        row = Row(prompt, time_state, params, self.tokenizer)
        self.waiting.append(row)
        self._ensure_loop()
        self.wake.set()
        try:
            while True:
                item = await row.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            row.cancelled = True  # the caller went away or finished: the loop drops the row

    def _ensure_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self.active and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
                if self.batch_wait_s:
                    await asyncio.sleep(self.batch_wait_s)  # let a burst of requests start together
            try:
                await self._admit()
                if self.active:
                    await self._decode_step()
            except Exception as error:  # a model failure ends the rows it hit, never the loop
                for row in self.active:
                    row.fail(error)
                self.active, self.state, self.logits = [], None, None

    async def _admit(self) -> None:
        """Prefill waiting rows into free batch slots and append their states to the batch state."""
        new_rows = []
        while self.waiting and len(self.active) + len(new_rows) < self.max_batch_size:
            row = self.waiting.popleft()
            if not row.cancelled:
                new_rows.append(row)
        if not new_rows:
            return
        try:
            prefilled = await self._in_worker(self._prefill_rows, new_rows)
        except Exception as error:
            for row in new_rows:
                row.fail(error)
            return
        states = [self.state] if self.state is not None else []
        logits = [self.logits] if self.logits is not None else []
        for row_logits, row_state in prefilled:
            states.append(row_state)
            logits.append(row_logits.unsqueeze(0))
        self.state, self.logits = RNNState.cat(states), torch.cat(logits)
        self.active.extend(new_rows)
        self.max_rows_seen = max(self.max_rows_seen, len(self.active))

    @torch.no_grad()
    def _prefill_rows(self, rows: list[Row]) -> list[tuple[torch.Tensor, RNNState]]:
        out = []
        for row in rows:
            private = None if row.time_state is None else row.time_state.clone()  # copy on start
            out.append(prefill(self.model, row.prompt, start_state(self.model, private)))
        return out

    async def _decode_step(self) -> None:
        """Sample one token for every row, retire finished rows, then advance the rest by one batched step."""
        tokens = await self._in_worker(self._sample, self.logits, self.active)
        for row, token in zip(self.active, tokens.tolist()):
            if not row.cancelled:
                row.take(token)
        keep = [i for i, row in enumerate(self.active) if not (row.done or row.cancelled)]
        if len(keep) < len(self.active):
            self.active = [self.active[i] for i in keep]
            if not keep:
                self.state, self.logits = None, None
                return
            index = torch.tensor(keep, device=self.logits.device)
            self.state, self.logits, tokens = self.state.rows(index), self.logits[index], tokens[keep]
        self.logits, self.state = await self._in_worker(self._step, tokens, self.state)
        self.steps += 1
        self.mixed_steps += len({id(row.time_state) for row in self.active}) > 1

    @torch.no_grad()
    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Greedy rows take the argmax; only sampled rows pay for softmax, sort and the nucleus cut."""
        tokens = logits.argmax(-1).cpu()
        shared = [i for i, row in enumerate(rows) if row.params.temperature > 0 and row.generator is None]
        if shared:
            tokens[shared] = self._sample_rows(logits, rows, shared, self.generator)
        for i, row in enumerate(rows):
            if row.params.temperature > 0 and row.generator is not None:
                tokens[i] = self._sample_rows(logits, rows, [i], row.generator)[0]
        return tokens

    @staticmethod
    def _sample_rows(logits, rows, picked: list[int], generator) -> torch.Tensor:
        index = torch.tensor(picked, device=logits.device)
        temperature = torch.tensor([rows[i].params.temperature for i in picked])
        top_p = torch.tensor([rows[i].params.top_p for i in picked])
        return sample(logits[index].cpu(), temperature, top_p, generator)

    @torch.no_grad()
    def _step(self, tokens: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        logits, state = self.model.step(tokens.to(self.model.emb.weight.device), state)
        return logits.float(), state

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

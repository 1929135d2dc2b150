"""Continuous batching with mixed states: rows that start from DIFFERENT tuned states run together.

A state is only L x [H,N,N] floats (plus two shift vectors per layer), so each row carries its own. The engine
keeps a preallocated pool of `max_batch_size` state slots on the model's device: a row joins by writing its
initial state into a free slot, runs by slot index, and leaves by freeing it. Nothing is concatenated or
rebuilt when rows come and go.

Each engine step is one hop to the worker thread and does, in order:
1. join: new rows' initial states (a tuned state, zeros, or a cached prefix) go into their slots;
2. prefill: one chunk of the waiting prompts, in ONE parallel forward over several rows, each from its own
   state. The rows advance by the same number of tokens (no padding to undo), and the chunk never crosses a
   row's prefix-cache boundary, so the state after every whole block is cached exactly;
3. decode: one token for every row whose prompt is done, sampled on the model's device, then one batched
   `model.step` for the rows that go on.
A prompt's chunks are bounded by a token budget, so a long prompt never stalls the decoding rows for long.
While a step computes, the loop delivers the tokens of the step before (text decoding, stop strings, streaming
out); a row whose last token the worker sampled takes no further step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import torch

from rwkvray.text.generate import sample
from rwkvray.model.rwkv import RWKV
from rwkvray.model.tuned_state import TunedState
from rwkvray.engine.metrics import EngineMetrics
from rwkvray.engine.prefix_cache import CachedPrefix, PrefixCache, prefix_digests
from rwkvray.engine.rows import Chunk, Row, SamplingParams
from rwkvray.engine.slot_pool import SlotPool
from rwkvray.text.tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 256
MAX_STREAM_INTERVAL_S = 1.0  # longer silences read as a stalled reply


@dataclass
class StepPlan:
    joining: list[Row]
    prefill: list[Row]
    chunk: int          # prompt tokens each prefill row advances by
    decode: list[Row]   # rows whose slot logits are ready before the step


def merge(chunk: Chunk, later):
    """Two consecutive chunks of a row as one; an error after a chunk wins (the text is lost with the stream)."""
    if isinstance(later, BaseException):
        return later
    return Chunk(chunk.text + later.text, later.finish_reason, later.prompt_tokens, later.completion_tokens)


class BatchEngine:
    """Owns the rows of one replica; `generate` is the only entry point."""

    def __init__(self, model: RWKV, tokenizer: Tokenizer, max_batch_size: int, batch_wait_s: float = 0.0,
                 seed: int = 0, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache_bytes: int = 0,
                 stream_interval_s: float = 0.0, stream_chunks_per_s: float = math.inf,
                 metrics: Optional[EngineMetrics] = None, threads: Optional[int] = None):
        """stream_interval_s: after a row's first chunk, its text goes out at most this often (each chunk is a
        message between processes in Serve, so fewer, longer chunks cost less per token).
        stream_chunks_per_s: the most chunks all streamed rows send in a second together; with more rows than
        that allows at stream_interval_s, each row waits longer (see `stream_interval`).
        threads: torch's intra-op threads on the worker thread that runs every step (None: the caller's count)."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.prefill_chunk = prefill_chunk
        self.stream_interval_s = stream_interval_s
        self.stream_chunks_per_s = stream_chunks_per_s
        self.streaming = 0  # rows whose caller reads their chunks as they come
        self.device = model.emb.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)  # rows without their own seed
        self.pool = SlotPool(model, max_batch_size)
        self.cache = PrefixCache(prefix_cache_bytes, prefill_chunk) if prefix_cache_bytes else None
        self.metrics = metrics or EngineMetrics()
        # OpenMP keeps torch's thread count per thread, so the worker sets its own
        self.threads = threads or torch.get_num_threads()
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkv-engine",
                                                            initializer=torch.set_num_threads,
                                                            initargs=(self.threads,))
        self.waiting: deque[Row] = deque()
        self.active: list[Row] = []  # rows holding a slot, in arrival order
        self.wake = asyncio.Event()
        self.loop_task: Optional[asyncio.Task] = None

    async def generate(self, prompt: list[int], tuned: Optional[TunedState], params: SamplingParams,
                       state_key: Optional[str] = None, streamed: bool = True) -> AsyncIterator[Chunk]:
        """Stream one request's chunks. tuned None starts from zeros; its tensors are never written.
        `state_key` names the tuned state for the prefix cache (None: this request neither reads nor fills it).
        streamed False: one chunk, the whole reply, when the row ends."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        row = Row(prompt, tuned, params, self.tokenizer, state_key, self.device)
        self.waiting.append(row)
        self._ensure_loop()
        self.wake.set()
        self.streaming += streamed
        try:
            if not streamed:
                await row.ended.wait()  # then the merge below makes the whole reply one chunk
            sent_at = None
            while True:
                item = await row.out.get()
                if sent_at is not None and isinstance(item, Chunk) and not item.finish_reason:
                    await row.ended_or_after(sent_at + self.stream_interval() - time.monotonic())
                while isinstance(item, Chunk) and not item.finish_reason and not row.out.empty():
                    item = merge(item, row.out.get_nowait())  # what came since the last chunk, as one
                if isinstance(item, BaseException):
                    raise item
                yield item
                sent_at = time.monotonic()
                if item.finish_reason:
                    return
        finally:
            self.streaming -= streamed
            row.cancelled = True  # the caller went away or finished: the loop frees the row's slot

    def stream_interval(self) -> float:
        """How long a streamed row holds its text between chunks: stream_interval_s, or longer while the
        streamed rows together would send more than stream_chunks_per_s chunks a second (at 8 streams on 2 CPU
        cores, 0.4 s instead of 0.2 s gave 5-16% more tokens/s), but not over MAX_STREAM_INTERVAL_S."""
        return max(self.stream_interval_s, min(self.streaming / self.stream_chunks_per_s, MAX_STREAM_INTERVAL_S))

    def _ensure_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Steps one after another; a step's tokens are delivered while the next one computes, so the Python of
        streaming them out does not leave the model idle."""
        finished = None  # (plan, sampled, seconds) of the step before, not yet delivered
        while True:
            if not self.active and not self.waiting and finished is None:
                self.wake.clear()
                await self.wake.wait()
                if self.batch_wait_s:
                    await asyncio.sleep(self.batch_wait_s)  # let a burst of requests start together
            plan = self._plan()
            started = time.monotonic()
            step = None if plan is None else asyncio.get_running_loop().run_in_executor(self.worker, self._step, plan)
            if finished is not None:
                self._finish(*finished)
                finished = None
            if step is None:
                continue
            try:
                finished = (plan, await step, time.monotonic() - started)
            except Exception as error:  # a model failure ends the rows it hit, never the loop
                for row in {*plan.joining, *plan.prefill, *plan.decode}:
                    row.fail(error)

    def _finish(self, plan: StepPlan, sampled: list[tuple[Row, int]], seconds: float) -> None:
        self._deliver(sampled)
        rows = {*plan.prefill, *(row for row, _ in sampled)}
        self.metrics.step(len(rows), len({id(row.tuned) for row in rows}), len(sampled),
                          len(plan.prefill) * plan.chunk, seconds)

    def _plan(self) -> Optional[StepPlan]:
        """Give waiting rows free slots, then pick this step's prefill chunk and decoding rows."""
        self._release()
        joining = []
        while self.waiting and self.pool.free:
            row = self.waiting.popleft()
            if row.cancelled:
                continue
            row.slot = self.pool.take()
            self._look_up_prefix(row)
            joining.append(row)
            self.active.append(row)
        decode = [row for row in self.active if row.decoding and not row.sampled_last and row not in joining]
        prefill = sorted((row for row in self.active if not row.decoding),
                         key=lambda row: len(row.prompt) - row.prefilled)[:self.prefill_chunk]
        chunk = 0
        if prefill:
            chunk = min(max(1, self.prefill_chunk // len(prefill)), *(self._to_boundary(row) for row in prefill))
        if not (joining or prefill or decode):
            return None
        return StepPlan(joining, prefill, chunk, decode)

    def _to_boundary(self, row: Row) -> int:
        """Tokens until the row's prompt ends or reaches the next whole block (a cacheable prefix)."""
        next_block = (row.prefilled // self.prefill_chunk + 1) * self.prefill_chunk
        return min(len(row.prompt), next_block) - row.prefilled

    def _look_up_prefix(self, row: Row) -> None:
        if self.cache is None or row.state_key is None:
            return
        row.digests = prefix_digests(row.prompt, self.prefill_chunk)
        row.prefilled, row.start_entry = self.cache.longest(row.state_key, row.digests)
        self.metrics.cache_lookup(row.start_entry is not None, self.cache.bytes)

    def _release(self) -> None:
        """Free the slots of rows that finished or whose client left."""
        for row in [row for row in self.active if row.done or row.cancelled]:
            self.active.remove(row)
            self.pool.give_back(row.slot)
            row.slot = None

    def _deliver(self, sampled: list[tuple[Row, int]]) -> None:
        now = time.monotonic()
        for row, token in sampled:
            if row.cancelled or row.done:
                continue
            if row.last_token_at is None:
                self.metrics.first_token(now - row.arrived)
            else:
                self.metrics.token_gap(now - row.last_token_at)
            row.last_token_at = now
            row.take(token)

    # ------------------------------------------------------------ the worker thread

    @torch.inference_mode()  # no autograd bookkeeping per op: the engine's tensors never need gradients
    def _step(self, plan: StepPlan) -> list[tuple[Row, int]]:
        """One engine step (see the module doc); returns the sampled (row, token) pairs."""
        for row in plan.joining:
            if row.start_entry is not None:
                self.pool.restore(row.slot, row.start_entry)
                row.start_entry = None
            else:
                self.pool.start(row.slot, row.tuned)
        ready = plan.decode + [row for row in plan.joining if row.decoding]
        if plan.prefill:
            ready += self._prefill(plan.prefill, plan.chunk)
        if not ready:
            return []
        ready.sort(key=lambda row: row.slot)  # consecutive slots are read and written as views, not copies
        tokens = self._sample(ready)
        going_on = [(row, token) for row, token in zip(ready, tokens) if row.count_sample(token)]
        if going_on:
            slots = [row.slot for row, _ in going_on]
            ids = torch.tensor([token for _, token in going_on], device=self.device)
            logits, state = self.model.step(ids, self.pool.read(slots))
            self.pool.write(slots, state)
            self.pool.logits[self.pool.index(slots)] = logits.float()
        return list(zip(ready, tokens))

    def _prefill(self, rows: list[Row], chunk: int) -> list[Row]:
        """Advance every row's prompt by `chunk` tokens in one forward; returns the rows whose prompt is done."""
        slots = [row.slot for row in rows]
        idx = torch.tensor([row.prompt[row.prefilled:row.prefilled + chunk] for row in rows], device=self.device)
        hidden, state = self.model.hidden(idx, self.pool.read(slots))
        self.pool.write(slots, state)
        for row in rows:
            row.prefilled += chunk
        caching = self.cache is not None
        needs_logits = [i for i, row in enumerate(rows)
                        if row.decoding or (caching and row.state_key is not None and self._at_block_end(row))]
        if needs_logits:
            logits = self.model.head(hidden[needs_logits, -1]).float()
            for i, row_logits in zip(needs_logits, logits):
                row = rows[i]
                self.pool.logits[row.slot] = row_logits
                if caching and row.state_key is not None and self._at_block_end(row):
                    length, digest = row.digests[row.prefilled // self.prefill_chunk - 1]
                    self.cache.put(row.state_key, length, digest,
                                   CachedPrefix(self.pool.snapshot(row.slot), row_logits.clone()))
        return [row for row in rows if row.decoding]

    def _at_block_end(self, row: Row) -> bool:
        return row.prefilled % self.prefill_chunk == 0

    def _sample(self, rows: list[Row]) -> list[int]:
        """Greedy rows take the argmax; sampled rows share the engine's generator unless seeded."""
        logits = self.pool.logits[self.pool.index([row.slot for row in rows])]
        tokens = logits.argmax(-1)
        shared = [i for i, row in enumerate(rows) if row.params.temperature > 0 and row.generator is None]
        if shared:
            tokens[shared] = self._draw(logits[shared], [rows[i] for i in shared], self.generator)
        for i, row in enumerate(rows):
            if row.params.temperature > 0 and row.generator is not None:
                tokens[i] = self._draw(logits[i:i + 1], [row], row.generator)[0]
        return tokens.tolist()

    def _draw(self, logits: torch.Tensor, rows: list[Row], generator) -> torch.Tensor:
        temperature = torch.tensor([row.params.temperature for row in rows], device=self.device)
        top_p = torch.tensor([row.params.top_p for row in rows], device=self.device)
        return sample(logits, temperature, top_p, generator)

"""Scoring eval items with the serving engine: every (item, state) pair, several states in each batch.

Log-probabilities come from one parallel forward per batch of sequences, each row from its own state (the
engine's slot pool builds the batched start state); greedy generation goes through Serve's BatchEngine itself,
so `rwkvray eval` and `POST /v1/evals` run the same code on the same engine. Both run on the engine's worker
thread, one step at a time.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rwkvray.eval.items import Item, Scored
from rwkvray.engine.batch_engine import BatchEngine
from rwkvray.engine.rows import SamplingParams
from rwkvray.engine.slot_pool import SlotPool
from rwkvray.model.tuned_state import TunedState

ANSWER_END = "\n\n"  # a generated answer ends at the first blank line


@dataclass
class Record:
    """One item scored from one state: what it predicted, and its value for each of the item's metrics."""
    state: str
    data: str
    index: int
    prediction: object  # the chosen index (choice), the text (generate), None (text, chat)
    values: dict[str, float]


@torch.no_grad()
def score_batch(model, sequences: list[tuple[Scored, Optional[TunedState]]]) -> list[tuple[float, int]]:
    """For each (sequence, its tuned start state): the summed log-probability of its masked tokens and their count,
    all rows in one forward (right-padded: RWKV is causal, so the pads change nothing before them)."""
    device = model.emb.weight.device
    width = max(len(seq.tokens) for seq, _ in sequences) - 1
    idx = torch.zeros(len(sequences), width, dtype=torch.long)
    pool = SlotPool(model, len(sequences))
    for row, (seq, tuned) in enumerate(sequences):
        idx[row, :len(seq.tokens) - 1] = torch.tensor(seq.tokens[:-1])
        pool.start(row, tuned)
    hidden, _ = model.hidden(idx.to(device), pool.read(list(range(len(sequences)))))
    out = []
    for row, (seq, _) in enumerate(sequences):
        scored = [i for i in range(1, len(seq.tokens)) if seq.mask[i]]
        logits = model.head(hidden[row, [i - 1 for i in scored]]).float()
        targets = torch.tensor([seq.tokens[i] for i in scored], device=device)
        logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1))
        out.append((logprobs.double().sum().item(), len(scored)))
    return out


def work_units(items: list[Item], states: dict) -> int:
    """What the progress bar counts: scored sequences and generations, once per state."""
    return len(states) * sum(max(1, len(item.scored)) for item in items)


async def evaluate(engine: BatchEngine, items: list[Item], states: dict[str, Optional[TunedState]],
                   max_tokens: int, batch_size: int, progress: Callable[[int], None] = lambda done: None
                   ) -> list[Record]:
    """Every item from every state (a name -> tuned, None for zeros); records in state order, then item
    order. `progress(n)` is told of each n finished work units."""
    sums = await score_all(engine, items, states, batch_size, progress)
    texts = await generate_all(engine, items, states, max_tokens, progress)
    records = []
    for name in states:
        for item in items:
            key = (name, item.data, item.index)
            if item.kind == "generate":
                records.append(generation_record(name, item, texts[key]))
            else:
                records.append(score_record(name, item, [sums[key, i] for i in range(len(item.scored))]))
    return records


async def score_all(engine, items, states, batch_size, progress) -> dict:
    """(state, data, index, sequence number) -> (summed log-prob, count). Sequences sorted by length, so a batch
    holds similar lengths, and an item's sequences for every state sit side by side."""
    jobs = [((name, item.data, item.index), i, seq, tuned)
            for item in items for i, seq in enumerate(item.scored) for name, tuned in states.items()]
    jobs.sort(key=lambda job: len(job[2].tokens))
    loop = asyncio.get_running_loop()
    sums = {}
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        scores = await loop.run_in_executor(engine.worker, score_batch, engine.model,
                                            [(seq, tuned) for _, _, seq, tuned in batch])
        for (key, i, _, _), score in zip(batch, scores):
            sums[key, i] = score
        progress(len(batch))
    return sums


async def generate_all(engine, items, states, max_tokens, progress) -> dict:
    """(state, data, index) -> greedy text, all rows handed to the engine at once (it batches them)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[ANSWER_END])

    async def one(name, item, tuned):
        text = "".join([chunk.text async for chunk in engine.generate(item.prompt, tuned, params, streamed=False)])
        progress(1)
        return (name, item.data, item.index), text.strip()

    return dict(await asyncio.gather(*(one(name, item, tuned) for item in items if item.kind == "generate"
                                       for name, tuned in states.items())))


def score_record(state: str, item: Item, sums: list[tuple[float, int]]) -> Record:
    if item.kind == "choice":
        totals = [total for total, _ in sums]
        chosen = max(range(len(totals)), key=totals.__getitem__)  # the first of equal scores
        return Record(state, item.data, item.index, chosen, {"mc_acc": float(chosen == item.answer)})
    total, count = sums[0]
    return Record(state, item.data, item.index, None, {"loss": -total / count})


def generation_record(state: str, item: Item, text: str) -> Record:
    values = {"exact": float(text in item.references), "contains": float(any(ref in text for ref in item.references))}
    return Record(state, item.data, item.index, text, values)

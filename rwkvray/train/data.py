"""Training data: load documents (jsonl text/chat, Megatron binidx, sft datasets, or one token stream: see
token_files.py), cut them into pieces, and build
batches that are a pure function of (seed, step, rank), so any Ray worker can resume at the same position.

A Document's `mask[i]` says whether predicting `tokens[i]` from `tokens[:i]` counts toward the loss.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from rwkvray.errors import UserError
from rwkvray.text.tokenizer import EOS_ID
from rwkvray.train.binidx import BINIDX_DTYPES, BINIDX_MAGIC, BINIDX_VERSION, binidx_prefix
from rwkvray.train.jsonl_rows import decode_line, document_text, line_segments, parse_line
from rwkvray.train.sft_data import sft_rows, sft_segments
from rwkvray.train.token_files import STREAM_TYPES, read_stream

DATA_TYPES = ("jsonl", "binidx", "sft", *STREAM_TYPES)
MAX_LISTED_PROBLEMS = 20  # a data check lists this many bad lines, then stops
PROGRESS_BYTES = 64 * 2**20  # a data check of a larger file prints its progress
LOSS_MASKS = ("none", "qa", "se")
DEFAULT_MARKERS = ("0", "1")  # RWKV-PEFT's --mask_id default: mask0 "0" turns the loss off, mask1 "1" on


@dataclass(eq=False)
class Document:
    """One tokenized document. jsonl gives int64 tokens; binidx gives read-only views of the memory-mapped
    .bin in its stored dtype (so a large corpus is not copied) with a broadcast all-ones mask."""

    tokens: np.ndarray
    mask: np.ndarray


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64, targets[:, t] follows input_ids[:, : t + 1]
    mask: torch.Tensor  # [B, T] float32, 1.0 where the target counts


# ---------------------------------------------------------------- loading


def load_documents(path: str | None, data_type: str = "jsonl", loss_mask: str = "none", tokenizer=None,
                   markers: tuple[str, str] = DEFAULT_MARKERS, sft_split: str = "train",
                   sft_field: Sequence[str] = ("query", "response")) -> list[Document]:
    """The documents of a data file; `markers` (loss_mask se), `sft_split` and `sft_field` (sft) as RWKV-PEFT's
    --mask_id mask0/mask1, --sft_split and --sft_field."""
    if data_type not in DATA_TYPES:
        raise UserError(f"data_type must be one of {', '.join(DATA_TYPES)} (got {data_type!r})")
    if loss_mask not in LOSS_MASKS:
        raise UserError(f"loss_mask must be one of {', '.join(LOSS_MASKS)} (got {loss_mask!r})")
    if loss_mask == "qa" and data_type != "jsonl" or loss_mask == "se" and data_type == "sft":
        raise UserError(f"loss_mask {loss_mask!r} does not apply to {data_type} data ({path})")
    tokenizer = tokenizer or default_tokenizer()
    if data_type == "binidx":
        documents = read_binidx(path)
    elif data_type == "sft":
        return [segmented_document(sft_segments(*row), tokenizer) for row in sft_rows(path, sft_split, sft_field)]
    elif data_type in STREAM_TYPES:
        tokens = read_stream(path, data_type, lambda: tokenizer)
        documents = [Document(tokens, np.broadcast_to(np.float32(1.0), (len(tokens),)))]
    else:
        documents = read_jsonl(path, "none" if loss_mask == "se" else loss_mask, tokenizer)
    if loss_mask == "se":
        off, on = (np.array(tokenizer.encode(marker), dtype=np.int64) for marker in markers)
        documents = [Document(d.tokens, marker_mask(d.tokens, off, on)) for d in documents]
    return documents


def default_tokenizer():
    from rwkvray.text.tokenizer import get_tokenizer

    return get_tokenizer()


def marker_mask(tokens: np.ndarray, off: np.ndarray, on: np.ndarray) -> np.ndarray:
    """RWKV-PEFT's loss_mask se: from each `on` marker (its tokens included) the loss counts, from each `off`
    marker it does not; it starts off, and a document with no counted token counts every token."""
    events = np.full(len(tokens), -1, dtype=np.int8)
    for marker, value in ((on, 1), (off, 0)):  # off second: where both match, off wins, as upstream checks it first
        if 0 < len(marker) <= len(tokens):
            windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens), len(marker))
            events[:len(windows)][(windows == marker).all(axis=1)] = value
    last = np.maximum.accumulate(np.where(events >= 0, np.arange(len(tokens)), -1))
    mask = np.where(last >= 0, events[np.maximum(last, 0)], 0).astype(np.float32)
    return mask if mask.any() else np.ones(len(tokens), dtype=np.float32)


def read_jsonl(path: str, loss_mask: str, tokenizer) -> list[Document]:
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    documents = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = decode_line(raw, where)
            if line:
                documents.append(line_document(parse_line(line, where), loss_mask, tokenizer, where))
    if not documents:
        raise UserError(f"{path}: no documents (the file has no non-blank lines)")
    return documents


def scan_jsonl(path: str, loss_mask: str, say=print, limit: int = MAX_LISTED_PROBLEMS,
               progress_from: int = PROGRESS_BYTES) -> list[str]:
    """Every problem read_jsonl would stop at, as `file:line: reason` (at most `limit`, then one more line saying
    so), without tokenizing: one streaming pass, with a progress line per tenth of a large file."""
    problems, documents, size = [], 0, os.path.getsize(path)
    next_mark = size // 10 if size >= progress_from else None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = decode_line(raw, where)
                if line:
                    line_segments(parse_line(line, where), loss_mask, where)
                    documents += 1
            except UserError as err:
                problems.append(str(err))
                if len(problems) == limit:
                    return problems + [f"{path}: stopped after {limit} bad lines; there may be more"]
            if next_mark is not None and f.tell() >= next_mark:
                say(f"checking {os.path.basename(path)}: {100 * f.tell() // size}% of {size / 2**20:.0f} MiB",
                    flush=True)
                next_mark += size // 10
    if not documents and not problems:
        problems.append(f"{path}: no documents (the file has no non-blank lines)")
    return problems


def line_document(record: dict, loss_mask: str, tokenizer, where: str) -> Document:
    if loss_mask == "none":
        tokens = tokenizer.encode(document_text(record, where)) + [EOS_ID]
        return Document(np.array(tokens, dtype=np.int64), np.ones(len(tokens), dtype=np.float32))
    return segmented_document(line_segments(record, loss_mask, where), tokenizer)


def segmented_document(segments: list[tuple[str, bool]], tokenizer) -> Document:
    """Tokenize segment by segment so the mask flips exactly on token boundaries; the final eos counts
    when the text ends inside a reply."""
    tokens: list[int] = []
    mask: list[float] = []
    for text, is_reply in segments:
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [float(is_reply)] * len(ids)
    tokens.append(EOS_ID)
    mask.append(float(segments[-1][1]))
    return Document(np.array(tokens, dtype=np.int64), np.array(mask, dtype=np.float32))


# ---------------------------------------------------------------- binidx (Megatron MMapIndexedDataset)


def read_binidx(path: str) -> list[Document]:
    """Documents of a Megatron .bin/.idx pair. Index layout (little endian): magic, u64 version, u8 dtype
    code, u64 sequence count, u64 doc_idx count, i32 sizes[n], i64 byte pointers[n], i64 doc_idx[m]; a
    document is the sequences doc_idx[d] .. doc_idx[d+1], stored contiguously."""
    bin_path, dtype, sizes, pointers, doc_idx = check_binidx(path)
    bin_size = os.path.getsize(bin_path)
    data = np.asarray(np.memmap(bin_path, dtype=dtype, mode="r")) if bin_size else np.zeros(0, dtype)
    documents = []
    for first, end in zip(doc_idx[:-1].tolist(), doc_idx[1:].tolist()):
        start = int(pointers[first]) // dtype.itemsize if end > first else 0
        length = int(sizes[first:end].sum())
        documents.append(Document(data[start : start + length], np.broadcast_to(np.float32(1.0), (length,))))
    return documents


def check_binidx(path: str) -> tuple[str, np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """The .bin path and the checked index of a binidx pair (the index is read, the .bin only measured)."""
    prefix = binidx_prefix(path)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for needed in (idx_path, bin_path):
        if not os.path.isfile(needed):
            raise UserError(f"binidx file not found: {needed}")
    dtype, sizes, pointers, doc_idx = read_binidx_index(idx_path)
    if len(sizes) and int((pointers + sizes.astype(np.int64) * dtype.itemsize).max()) > os.path.getsize(bin_path):
        raise UserError(f"{bin_path}: shorter than its index says (truncated .bin?)")
    if len(doc_idx) < 2:
        raise UserError(f"{idx_path}: no documents in the binidx index")
    return bin_path, dtype, sizes, pointers, doc_idx


def read_binidx_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    with open(idx_path, "rb") as f:
        raw = f.read()
    header = struct.Struct("<9sQBQQ")
    if len(raw) < header.size or raw[:9] != BINIDX_MAGIC:
        raise UserError(f"{idx_path}: not a Megatron binidx index (bad magic {raw[:9]!r})")
    _, version, dtype_code, n_sequences, n_doc_idx = header.unpack_from(raw)
    if version != BINIDX_VERSION:
        raise UserError(f"{idx_path}: unsupported binidx version {version} (expected {BINIDX_VERSION})")
    if dtype_code not in BINIDX_DTYPES:
        raise UserError(f"{idx_path}: unsupported token dtype code {dtype_code} (integer codes: 1-5, 8)")
    if len(raw) < header.size + 12 * n_sequences + 8 * n_doc_idx:
        raise UserError(f"{idx_path}: truncated binidx index")
    sizes = np.frombuffer(raw, np.int32, n_sequences, header.size)
    pointers = np.frombuffer(raw, np.int64, n_sequences, header.size + 4 * n_sequences)
    doc_idx = np.frombuffer(raw, np.int64, n_doc_idx, header.size + 12 * n_sequences)
    if len(doc_idx) and (doc_idx[0] != 0 or doc_idx[-1] != n_sequences or np.any(np.diff(doc_idx) < 0)):
        raise UserError(f"{idx_path}: corrupt doc_idx (must rise from 0 to the sequence count {n_sequences})")
    return np.dtype(BINIDX_DTYPES[dtype_code]), sizes, pointers, doc_idx


# ---------------------------------------------------------------- pieces and batches


def piece_spans(documents: Sequence[Document], ctx_len: int, first_only: bool = False) -> np.ndarray:
    """[N, 3] rows (doc, start, end): each document cut into pieces of at most ctx_len + 1 tokens, consecutive
    pieces sharing one token so every target is predicted exactly once; with first_only, only each document's
    first piece (RWKV-PEFT's dataload pad/only). Pieces with no counted target are left out (state tuning
    restarts every piece from the learned state, so they add no gradient)."""
    if ctx_len < 1:
        raise UserError(f"ctx_len must be at least 1 (got {ctx_len})")
    lengths = np.array([len(d.tokens) for d in documents], dtype=np.int64)
    counts = (np.maximum(lengths - 1, 0) + ctx_len - 1) // ctx_len
    doc_ids = np.repeat(np.arange(len(documents)), counts)
    first_piece = np.repeat(np.cumsum(counts) - counts, counts)
    starts = (np.arange(len(doc_ids)) - first_piece) * ctx_len
    ends = np.minimum(starts + ctx_len + 1, lengths[doc_ids])
    keep = [bool(documents[d].mask[s + 1 : e].any()) and (s == 0 or not first_only)
            for d, s, e in zip(doc_ids, starts, ends)]
    return np.stack([doc_ids, starts, ends], axis=1)[np.array(keep, dtype=bool)].reshape(-1, 3)


def assemble_batch(documents: Sequence[Document], spans: np.ndarray) -> Batch:
    """Right-pad to the longest piece; pads are token 0 with mask 0 (RWKV is causal, so trailing pads do not
    change the real positions)."""
    width = int((spans[:, 2] - spans[:, 1]).max()) - 1
    input_ids = np.zeros((len(spans), width), dtype=np.int64)
    targets = np.zeros((len(spans), width), dtype=np.int64)
    mask = np.zeros((len(spans), width), dtype=np.float32)
    for row, (doc, start, end) in enumerate(spans.tolist()):
        tokens = np.asarray(documents[doc].tokens[start:end], dtype=np.int64)
        n = end - start - 1
        input_ids[row, :n] = tokens[:-1]
        targets[row, :n] = tokens[1:]
        mask[row, :n] = documents[doc].mask[start + 1 : end]
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(targets), torch.from_numpy(mask))


class TokenBatcher:
    """Batches as a pure function of (seed, step, rank): pieces are drawn with replacement by a generator
    seeded with those three numbers, so a resumed run gets the same batches and the draw does not depend
    on how many documents there are. first_only: each document's first piece only (RWKV-PEFT's dataload pad)."""

    def __init__(self, documents: Sequence[Document], ctx_len: int, seed: int, first_only: bool = False):
        if seed < 0:
            raise UserError(f"seed must be non-negative (got {seed})")
        self.documents = documents
        self.ctx_len = ctx_len
        self.seed = seed
        self.spans = piece_spans(documents, ctx_len, first_only)
        if len(self.spans) == 0:
            raise UserError("no training pieces: every document is shorter than 2 tokens or has no counted target")

    def batch(self, step: int, rank: int, world_size: int, micro_bsz: int) -> Batch:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if step < 0 or micro_bsz < 1:
            raise ValueError(f"need step >= 0 and micro_bsz >= 1 (got step={step}, micro_bsz={micro_bsz})")
        rng = np.random.default_rng([self.seed, step, rank])
        picks = rng.integers(0, len(self.spans), size=micro_bsz)
        return assemble_batch(self.documents, self.spans[picks])


def eval_batches(documents: Sequence[Document], ctx_len: int, micro_bsz: int) -> Iterator[Batch]:
    """Every piece exactly once, in document order (the last batch may be smaller)."""
    spans = piece_spans(documents, ctx_len)
    for first in range(0, len(spans), micro_bsz):
        yield assemble_batch(documents, spans[first : first + micro_bsz])


def split_holdout(documents: Sequence[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """A seeded random holdout of about `fraction` of the documents, at least one on each side when there
    are two or more; both sides keep the original order."""
    if not 0 < fraction < 1:
        raise UserError(f"holdout fraction must be between 0 and 1 (got {fraction})")
    if len(documents) < 2:
        return list(documents), []
    n_val = min(max(round(len(documents) * fraction), 1), len(documents) - 1)
    val_ids = set(np.random.default_rng(seed).permutation(len(documents))[:n_val].tolist())
    train = [d for i, d in enumerate(documents) if i not in val_ids]
    val = [d for i, d in enumerate(documents) if i in val_ids]
    return train, val

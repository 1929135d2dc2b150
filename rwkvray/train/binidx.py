"""RWKV-LM's binidx (Megatron's MMapIndexedDataset) format, and writing it as RWKV-LM's make_data.py does: the
documents' uint16 tokens back to back in PREFIX.bin; in PREFIX.idx one sequence per document (its size and byte
offset) and the document index 0, 1, ..., n. data.py's read_binidx reads it; docs/binidx-facts.md has the layout.
No torch here, so `rwkvray prepare-data` starts fast."""
from __future__ import annotations

import struct

import numpy as np

BINIDX_MAGIC = b"MMIDIDX\x00\x00"
BINIDX_VERSION = 1
BINIDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
TOKEN_DTYPE = np.dtype("<u2")  # make_data.py's dtype: the World vocabulary has 65536 ids
TOKEN_CODE = next(code for code, dtype in BINIDX_DTYPES.items() if dtype == np.uint16)
COPY_TOKENS = 8 * 2**20  # a shuffled copy writes this many tokens at a time


def binidx_prefix(path: str) -> str:
    for extension in (".bin", ".idx"):
        if path.endswith(extension):
            return path[: -len(extension)]
    return path


class BinidxWriter:
    """Appends documents to an open .bin file and keeps their sizes for the index."""

    def __init__(self, bin_file):
        self.bin_file = bin_file
        self.size_parts: list[np.ndarray] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Documents given back to back: `tokens` holds them all, `sizes` the length of each."""
        self.bin_file.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        self.size_parts.append(np.asarray(sizes, dtype=np.int32))
        self.tokens += len(tokens)

    def sizes(self) -> np.ndarray:
        return np.concatenate(self.size_parts) if self.size_parts else np.zeros(0, np.int32)


def index_bytes(sizes: np.ndarray) -> bytes:
    """The .idx of documents of these sizes stored in order: magic, version, dtype code, counts, then the sizes
    (int32), byte pointers (int64) and document index (int64), little endian."""
    sizes = np.asarray(sizes, dtype="<i4")
    pointers = np.zeros(len(sizes), dtype="<i8")
    np.cumsum(sizes[:-1].astype("<i8") * TOKEN_DTYPE.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(sizes) + 1, dtype="<i8")
    header = struct.pack("<9sQBQQ", BINIDX_MAGIC, BINIDX_VERSION, TOKEN_CODE, len(sizes), len(doc_idx))
    return header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes()


def shuffle_order(documents: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(documents)


def write_shuffled(bin_path: str, sizes: np.ndarray, order: np.ndarray, out_file) -> np.ndarray:
    """Copy the documents of the .bin at `bin_path` (of these sizes) to `out_file` in `order`; their sizes in
    that order."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    data = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r") if starts[-1] else np.zeros(0, TOKEN_DTYPE)
    pending, pending_tokens = [], 0
    for document in order.tolist():
        pending.append(data[starts[document] : starts[document + 1]])
        pending_tokens += len(pending[-1])
        if pending_tokens >= COPY_TOKENS:
            out_file.write(np.concatenate(pending).tobytes())
            pending, pending_tokens = [], 0
    if pending:
        out_file.write(np.concatenate(pending).tobytes())
    return np.asarray(sizes)[order]

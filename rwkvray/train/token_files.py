"""Token streams: the data types that hold one long run of tokens instead of documents, as RWKV-PEFT reads them.

utf-8 and utf-16le are plain text files (tokenized here with the World tokenizer), numpy is a 1-D .npy of token ids,
uint16 a raw little-endian uint16 token file, and dummy RWKV-LM's synthetic sums text (for benchmarks; no file).
Each becomes one document, which the batcher cuts into ctx_len pieces and draws at random, like binidx.
Each check here raises the one line that names the file and what is wrong, before anything starts.
"""

from __future__ import annotations

import codecs
import os

import numpy as np

from rwkvray.errors import UserError

TEXT_TYPES = ("utf-8", "utf-16le")
STREAM_TYPES = (*TEXT_TYPES, "numpy", "uint16", "dummy")
READ_BYTES = 16 * 2**20  # a text check decodes the file in pieces of this size
DUMMY_SUMS = 100_000  # RWKV-LM's dummy data: this many ".a+b=c." sums


def read_stream(path: str | None, data_type: str, tokenizer_factory) -> np.ndarray:
    """The whole stream's token ids."""
    if data_type in TEXT_TYPES or data_type == "dummy":
        text = dummy_text() if data_type == "dummy" else read_text(path, data_type)
        tokens = np.array(tokenizer_factory().encode(text), dtype=np.int64)
    else:
        tokens = token_array(path, data_type)
    if len(tokens) < 2:
        raise UserError(f"{path}: {len(tokens)} token(s); training needs at least 2")
    return tokens


def dummy_text() -> str:
    """RWKV-LM's dummy data: sums ".a+b=c." with a = i mod 10000 and b = i² mod 10000, so the model can learn it."""
    return "".join(f".{i % 10000}+{i * i % 10000}={i % 10000 + i * i % 10000}." for i in range(DUMMY_SUMS))


def read_text(path: str, encoding: str) -> str:
    check_text(path, encoding)
    with open(path, encoding=encoding) as f:
        return f.read()


def check_text(path: str, encoding: str) -> None:
    """The file decodes as `encoding` from start to end; the first bad byte is named by its offset."""
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file")
    decoder = codecs.getincrementaldecoder(encoding)()
    done = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not valid {encoding} at byte {done + e.start} ({e.reason})") from None
            if not chunk:
                return
            done += len(chunk)


def token_array(path: str, data_type: str) -> np.ndarray:
    """The token ids of a numpy or uint16 file, memory-mapped (read-only, not copied)."""
    if data_type == "uint16":
        size = os.path.getsize(path)
        if size % 2:
            raise UserError(f"{path}: {size} bytes, an odd length: a uint16 token file has 2 bytes per token")
        return np.memmap(path, dtype="<u2", mode="r") if size else np.zeros(0, np.uint16)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a .npy array file ({e})") from None
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{path}: a numpy token file holds a 1-D array of integer token ids "
                        f"(got a {array.ndim}-D {array.dtype} array)")
    return array


def check_token_ids(path: str, tokens: np.ndarray, vocab_size: int) -> None:
    """Every id is in 0 .. vocab_size-1; the first one that is not is named with its position."""
    if len(tokens) == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high < vocab_size:
        return
    bad = int(np.argmax((tokens < 0) | (tokens >= vocab_size)))
    raise UserError(f"{path}: token id {int(tokens[bad])} at position {bad} is outside the model's vocabulary "
                    f"(0 to {vocab_size - 1})")


def check_stream(path: str, data_type: str, vocab_size: int) -> None:
    """What read_stream would stop at, without tokenizing: text decodes, token files hold ids below vocab_size."""
    if data_type in TEXT_TYPES:
        check_text(path, data_type)
    elif data_type in ("numpy", "uint16"):
        tokens = token_array(path, data_type)
        if len(tokens) < 2:
            raise UserError(f"{path}: {len(tokens)} token(s); training needs at least 2")
        check_token_ids(path, tokens, vocab_size)

"""jsonl documents tokenized as RWKV-LM's make_data.py does, one byte range of a file at a time, so that ranges can
be tokenized in parallel (`rwkvray prepare-data` runs this on Ray Data; nothing here needs Ray).

A range holds the lines whose first byte lies in it, so the ranges of a file, in order, hold each line exactly
once. Lines end at b"\\n" only, as when training reads the file. A range does not know its first line number; it
reports how many lines it holds, and whoever puts the ranges back in order names a bad line by file and number.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rwkvray.errors import UserError
from rwkvray.text.tokenizer import EOS_ID
from rwkvray.train.jsonl_rows import decode_line, document_text, parse_line

TAIL_READ_BYTES = 256 * 2**10  # a range's last line is read on in pieces of this size


@dataclass
class RangeTokens:
    """The documents of one byte range, back to back, or the first bad line of the range."""

    tokens: np.ndarray  # uint16 (the .bin's dtype): each document's tokens, then EOS_ID
    sizes: np.ndarray  # int32: tokens per document
    lines: int  # lines in the range, blank ones included
    problem_line: int = -1  # index within the range of the first bad line, -1 when there is none
    problem: str = ""  # what is wrong with it (the text after "FILE:LINE: ")


def byte_ranges(size: int, range_bytes: int) -> list[tuple[int, int]]:
    """[start, end) pieces of a file of `size` bytes."""
    return [(start, min(start + range_bytes, size)) for start in range(0, size, range_bytes)]


def read_range(f, start: int, end: int) -> bytes:
    """The lines whose first byte is in [start, end) of the seekable binary file `f`, each with its b"\\n"."""
    if start == 0:
        f.seek(0)
        data = f.read(end)
    else:
        f.seek(start - 1)
        before = f.read(end - start + 1)
        newline = before.find(b"\n")
        if newline < 0 or start + newline >= end:  # no line starts here: the range is inside one long line
            return b""
        data = before[newline + 1 :]
    while data and not data.endswith(b"\n"):  # the last line runs past `end`: read on to its end
        more = f.read(TAIL_READ_BYTES)
        if not more:
            break
        newline = more.find(b"\n")
        data += more if newline < 0 else more[: newline + 1]
        if newline >= 0:
            break
    return data


def split_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return lines[:-1] if data.endswith(b"\n") or not data else lines


def document_tokens(raw: bytes, where: str, tokenizer) -> list[int] | None:
    """One jsonl line as make_data.py writes it: the text's tokens, then EOS_ID; None for a blank line. A line
    without text, or whose text does not come back from the tokenizer unchanged, is refused naming `where`."""
    line = decode_line(raw, where)
    if not line:
        return None
    text = document_text(parse_line(line, where), where)
    if not text:
        raise UserError(f'{where}: no text (an empty "text", or "messages" that render to nothing)')
    ids = tokenizer.encode(text)
    if not tokenizer.round_trips(ids, text):
        raise UserError(f"{where}: the text does not round-trip through the World tokenizer "
                        f"({first_difference(text, tokenizer.decode(ids))})")
    return ids + [EOS_ID]


def first_difference(text: str, decoded: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(text, decoded)) if a != b), min(len(text), len(decoded)))
    was, became = text[at : at + 1], decoded[at : at + 1]
    return f"character {at + 1}, {was!r}, decodes as {became!r}"


def tokenize_lines(data: bytes, where: str, tokenizer) -> RangeTokens:
    """The documents of the lines in `data` (as read_range gives them), stopping at the first bad line; `where`
    names the file in the problem's wording, which RangeTokens.problem leaves out."""
    tokens: list[int] = []
    sizes: list[int] = []
    lines = split_lines(data)
    for index, raw in enumerate(lines):
        try:
            document = document_tokens(raw, where, tokenizer)
        except UserError as err:
            return RangeTokens(np.zeros(0, np.uint16), np.zeros(0, np.int32), len(lines), index,
                               str(err).removeprefix(f"{where}: "))
        if document is not None:
            tokens += document
            sizes.append(len(document))
    return RangeTokens(np.array(tokens, dtype=np.uint16), np.array(sizes, dtype=np.int32), len(lines))

"""RWKV World tokenizer (vocab `rwkv_vocab_v20230424`), fully offline.

Encoding is greedy longest-match over UTF-8 bytes. The Rust `WorldTokenizer` from `pyrwkv_tokenizer` does it
fast; a pure-Python matcher over the same vocab file is the fallback. Decoding is always done here from an
id -> bytes table, because the Rust decoder panics (a BaseException) on a partial UTF-8 character.
"""

from __future__ import annotations

import ast
import codecs
import functools
import importlib.util
import os

import numpy as np

from rwkvray.errors import UserError

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
EOS_ID = 0  # end of text: closes every training document, ends every generation
BACKENDS = ("auto", "rust", "python")


def default_vocab_path() -> str:
    """The vocab file shipped inside the `pyrwkv_tokenizer` package (found without importing its extension)."""
    spec = importlib.util.find_spec("pyrwkv_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"RWKV World vocab not found: install pyrwkv-tokenizer or pass the path of {VOCAB_FILE_NAME}")
    return os.path.join(list(spec.submodule_search_locations)[0], VOCAB_FILE_NAME)


def read_vocab(path: str) -> dict[int, bytes]:
    """Parse lines of the form `id python-literal byte-length` (the literal is a str or bytes literal)."""
    if not os.path.isfile(path):
        raise UserError(f"vocab file not found: {path}")
    vocab: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            try:
                token_id = int(line[: line.index(" ")])
                literal = ast.literal_eval(line[line.index(" ") + 1 : line.rindex(" ")])
                length = int(line[line.rindex(" ") + 1 :])
            except (ValueError, SyntaxError) as e:
                raise UserError(f"{path}:{lineno}: not a vocab line `id literal length` ({e})") from None
            token = literal.encode("utf-8") if isinstance(literal, str) else literal
            if not isinstance(token, bytes) or len(token) != length:
                raise UserError(f"{path}:{lineno}: token length does not match the stated byte length {length}")
            vocab[token_id] = token
    return vocab


class GreedyMatcher:
    """Pure-Python greedy longest-match encoder.

    Candidates are grouped by their first two bytes (longest first), so each position checks only the few
    tokens that could match there instead of walking all lengths up to the longest token.
    """

    def __init__(self, vocab: dict[int, bytes]):
        self.id_of = {token: token_id for token_id, token in vocab.items()}
        lengths_by_prefix: dict[bytes, set[int]] = {}
        for token in self.id_of:
            lengths_by_prefix.setdefault(token[:2], set()).add(len(token))
        self.lengths_by_prefix = {p: sorted(ls, reverse=True) for p, ls in lengths_by_prefix.items()}

    def encode(self, data: bytes) -> list[int]:
        ids = []
        pos = 0
        while pos < len(data):
            for length in self.lengths_by_prefix.get(data[pos : pos + 2], ()):
                token_id = self.id_of.get(data[pos : pos + length])
                if token_id is not None:
                    break
            else:
                token_id = self.id_of[data[pos : pos + 1]]
                length = 1
            ids.append(token_id)
            pos += length
        return ids


def load_rust_encoder(vocab_path: str):
    """The Rust encoder, or None when the extension cannot be imported."""
    try:
        from pyrwkv_tokenizer import WorldTokenizer
    except ImportError:
        return None
    return WorldTokenizer(vocab_path)


def replace_lone_surrogates(text: str) -> str:
    """Unpaired surrogates (possible from JSON `\\ud83d` escapes) cannot be UTF-8 encoded; make them U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """RWKV World tokenizer. backend: "auto" (Rust if importable, else Python), "rust" or "python"."""

    vocab_size: int = 65536

    def __init__(self, vocab_path: str | None = None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise UserError(f"tokenizer backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        self.vocab_path = vocab_path or default_vocab_path()
        vocab = read_vocab(self.vocab_path)
        self.bytes_of = [b""] * self.vocab_size
        for token_id, token in vocab.items():
            self.bytes_of[token_id] = token
        self.rust = load_rust_encoder(self.vocab_path) if backend != "python" else None
        if backend == "rust" and self.rust is None:
            raise UserError("tokenizer backend 'rust' requested but pyrwkv_tokenizer cannot be imported")
        self.python = GreedyMatcher(vocab) if self.rust is None else None

    @property
    def backend(self) -> str:
        return "rust" if self.rust is not None else "python"

    def encode(self, text: str) -> list[int]:
        try:
            return self._encode(text)
        except UnicodeEncodeError:
            return self._encode(replace_lone_surrogates(text))

    def _encode(self, text: str) -> list[int]:
        if self.rust is not None:
            return list(self.rust.encode(text))
        return self.python.encode(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocab [0, {self.vocab_size})")
        return b"".join(self.bytes_of[i] for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def round_trips(self, ids: list[int], text: str) -> bool:
        """decode(ids) == text, compared as bytes (fast; an unpaired surrogate in `text` never matches)."""
        return b"".join(map(self.bytes_of.__getitem__, ids)) == text.encode("utf-8", "surrogatepass")


class StreamDecoder:
    """Turns generated token ids into text as it completes, holding back an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self.utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """The held-back tail (as U+FFFD if it never completed); the decoder is ready for a new stream after."""
        text = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return text


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (the vocab takes about a second to load)."""
    return Tokenizer()

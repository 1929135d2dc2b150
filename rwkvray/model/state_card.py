"""State cards: `<stem>.json` beside each state file `<stem>.pth`, naming the exact base it was tuned on.

A tuned state works only on the model it was tuned on, so the card records that model's sha256 and dims,
with the method, the data file, the steps and the last losses. The `.pth` stays RWKV-PEFT's plain tensor dict.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

from rwkvray.files import storage
from rwkvray.files.atomic import write_bytes_atomically
from rwkvray.files.cache import recorded_sha256


def card_path(state_path: str) -> str:
    return os.path.splitext(state_path)[0] + ".json"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process (a 3 GB base takes seconds); a
    file of the download cache has it recorded beside it, computed once while downloading."""
    recorded = recorded_sha256(path)
    if recorded is not None:
        return recorded
    info = os.stat(path)
    return _sha256(os.path.abspath(path), info.st_size, info.st_mtime_ns)


def base_fingerprint(model_path: str, dims=None) -> dict:
    """The card's "base" entry for a model file; dims are read from the file when not given."""
    if dims is None:
        from rwkvray.model.checkpoint import infer_dims, read_tensor_dict
        dims = infer_dims(read_tensor_dict(model_path))
    return {"sha256": file_sha256(model_path), "file": os.path.basename(model_path), "version": dims.version,
            "n_layer": dims.n_layer, "n_embd": dims.n_embd, "head_size": dims.head_size,
            "vocab_size": dims.vocab_size}


def card_bytes(card: dict) -> bytes:
    return (json.dumps(card, indent=2) + "\n").encode()


def write_card(path: str, card: dict) -> None:
    """Write the card beside the state file `path` (a `.pth` path, or the `.json` path itself)."""
    write_bytes_atomically(card_path(path), card_bytes(card))


def read_card(state_path: str) -> dict | None:
    """The card beside a state file (on disk or in a bucket), or None when there is none; an unreadable card is
    a ValueError."""
    path = card_path(state_path)
    raw = storage.read_bytes(path)
    if raw is None:
        return None
    try:
        card = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: not a JSON object (a state card must be one)")
    return card


def base_mismatch(card: dict | None, model_path: str) -> str | None:
    """A one-line warning when the card names a different base than `model_path`, else None."""
    base = (card or {}).get("base")
    if not isinstance(base, dict) or "sha256" not in base:
        return None
    if base["sha256"] == file_sha256(model_path):
        return None
    return (f"the state was tuned on {base.get('file', '?')} (sha256 {base['sha256'][:12]}…), "
            f"not on {os.path.basename(model_path)}: a state works only on the exact model it was tuned on")

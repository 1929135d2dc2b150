"""State cards: `<stem>.json` beside a state file `<stem>.pth`, saying which base model the state was tuned on.

A state works only on the exact model it was tuned on, so the card records the base file's sha256 and dims.
The `.pth` itself stays RWKV-PEFT's plain tensor dict.
"""
from __future__ import annotations

import hashlib
import json
import os

from rwkvray.atomic import write_bytes_atomically

HASH_BLOCK = 2**20


def card_path(state_path: str) -> str:
    return os.path.splitext(state_path)[0] + ".json"


def read_card(state_path: str) -> dict | None:
    """The card beside a state file, or None when there is none; an unreadable card is a ValueError."""
    path = card_path(state_path)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            card = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: a state card must be a JSON object")
    return card


def write_card(path: str, card: dict) -> None:
    """Write `card` atomically to `path` (the .json beside a state file)."""
    write_bytes_atomically(path, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def base_fingerprint(model_path: str) -> dict:
    """The card's "base" entry for a model checkpoint."""
    from rwkvray.checkpoint import load_checkpoint
    dims = load_checkpoint(model_path).dims
    return {"sha256": file_sha256(model_path), "file": os.path.basename(model_path), "version": dims.version,
            "n_layer": dims.n_layer, "n_embd": dims.n_embd, "head_size": dims.head_size,
            "vocab_size": dims.vocab_size}

"""Publish a state into a Serve `states_dir`: `NAME.pth` with its card `NAME.json`, where Serve finds it by name.

The folder is local or a URI (s3://...), through run storage. Each file is written whole (temp file and rename
on disk; an object store's put is atomic by itself), the card first, so a state that appears has its card.
A different state already published under the name is never overwritten silently: without `replace` that is
an error, and with it the old state and its card are kept as `NAME.prev.pth` and `NAME.prev.json`. Publishing
the very same state again only refreshes its card.
"""
import re

from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.files.versions import PREVIOUS_MARK as PREVIOUS

STATE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # no leading dot: no "..", no hidden files
NAME_RULE = "1-128 of A-Z a-z 0-9 . _ - (not starting with '.')"


def state_file(states_dir: str, name: str) -> str:
    return storage.join(states_dir, name + ".pth")


def card_file(states_dir: str, name: str) -> str:
    return storage.join(states_dir, name + ".json")


def different_state_there(states_dir: str, name: str, state: bytes | None = None) -> bool:
    """Whether `name` already holds a state other than `state` (any state, when `state` is None)."""
    existing = storage.read_bytes(state_file(states_dir, name))
    return existing is not None and existing != state


def refusal(states_dir: str, name: str, how_to_replace: str) -> UserError:
    return UserError(f"{state_file(states_dir, name)} already holds a different state; {how_to_replace} to "
                     f"replace it (the old one is kept as {name}{PREVIOUS}.pth), or publish under another name")


def publish_state(state: bytes, card: bytes | None, states_dir: str, name: str, replace: bool,
                  how_to_replace: str) -> str:
    """Write `state` (and its card) as `name` into states_dir; returns the line that says what happened.
    `how_to_replace` completes the refusal in the user's terms ("set run.publish.replace: true")."""
    if not STATE_NAME.fullmatch(name):
        raise UserError(f"state name {name!r}: use {NAME_RULE}")
    target = state_file(states_dir, name)
    existing = storage.read_bytes(target)
    if existing == state:
        _write_card(states_dir, name, card)
        return f"{name} already published: {target}"
    kept = ""
    if existing is not None:
        if not replace:
            raise refusal(states_dir, name, how_to_replace)
        previous = name + PREVIOUS
        _write_card(states_dir, previous, storage.read_bytes(card_file(states_dir, name)))
        storage.write_bytes(state_file(states_dir, previous), existing)
        kept = f" (the state it replaced is kept as {previous})"
    _write_card(states_dir, name, card)
    storage.write_bytes(target, state)
    return f"published {name}: {target}{kept}"


def _write_card(states_dir: str, name: str, card: bytes | None) -> None:
    """The card, or no card at all: a stale card must not describe another state."""
    if card is None:
        storage.delete(card_file(states_dir, name))
    else:
        storage.write_bytes(card_file(states_dir, name), card)

"""Publish a state into a Serve `states_dir`: `NAME.pth` with its card `NAME.json`, where Serve finds it by name.

The folder is local or a URI (s3://...), through storage. Each file is written whole, the card first, so a state
that appears has its card (files/versions.py, the same path Serve's uploads and blends take). A different state
already published under the name is never overwritten silently: without `replace` that is an error, and with it
the old state and its card are kept as `NAME.prev.pth` and `NAME.prev.json`. Publishing the very same state
again only refreshes its card.
"""
import re

from rwkvray.errors import UserError
from rwkvray.files import storage
from rwkvray.files.versions import PREVIOUS_MARK as PREVIOUS, NameTaken, write_new_version, write_or_delete

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
    target, card_target = state_file(states_dir, name), card_file(states_dir, name)
    if storage.read_bytes(target) == state:
        write_or_delete(card_target, card)  # a stale card must not describe another state
        return f"{name} already published: {target}"
    try:
        kept = write_new_version(target, state, replace, {card_target: card})
    except NameTaken:
        raise refusal(states_dir, name, how_to_replace) from None
    return f"published {name}: {target}" + (f" (the state it replaced is kept as {name}{PREVIOUS})" if kept else "")

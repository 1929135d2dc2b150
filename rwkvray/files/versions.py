"""Never overwrite silently: a file is written under a taken name only when the caller says replace, and then
the current file (and its companions, such as a state's card) is kept as the previous version.

`NAME.pth` with its card `NAME.json` becomes `NAME.prev.pth` with `NAME.prev.json`; one previous version is kept
(a second replacement overwrites it). The folder is local or a URI (files/storage.py), and every file is written
whole (temp file and rename on disk; one object put or copy in a bucket): a name always holds a whole file.
"""
import os
import posixpath

from rwkvray.files import storage

PREVIOUS_MARK = ".prev"


class NameTaken(FileExistsError):
    """The target exists and the caller did not ask to replace it."""


def previous_path(path: str) -> str:
    """Where the previous version of `path` is kept: NAME.prev.EXT beside NAME.EXT."""
    stem, ext = (posixpath if storage.is_uri(path) else os.path).splitext(path)
    return stem + PREVIOUS_MARK + ext


def write_new_version(path: str, payload: bytes, replace: bool,
                      companions: dict[str, bytes | None] | None = None) -> bool:
    """Write `payload` as `path`, and each companion file with its content (None: no such file any more).

    If `path` exists: without `replace`, raise NameTaken before anything is written; with it, keep the current
    file and each companion as their previous versions first. A companion that does not exist drops its stale
    previous version, so the previous pair stays consistent. The companions are written before `path`, so a
    file that appears has its companions. Returns whether a previous version was kept."""
    companions = companions or {}
    exists = storage.is_file(path)
    if exists and not replace:
        raise NameTaken(path)
    if exists:
        for original in (path, *companions):
            keep_previous(original)
    for companion, content in companions.items():
        write_or_delete(companion, content)
    storage.write_bytes(path, payload)
    return exists


def keep_previous(path: str) -> None:
    """Copy `path` to its previous-version name, or remove that copy when `path` is gone."""
    previous = previous_path(path)
    if storage.is_file(path):
        storage.copy(path, previous)
    else:
        storage.delete(previous)


def write_or_delete(path: str, content: bytes | None) -> None:
    if content is None:
        storage.delete(path)
    else:
        storage.write_bytes(path, content)

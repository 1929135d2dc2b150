"""Never overwrite silently: a file is written under a taken name only when the caller says replace, and then
the current file (and its companions, such as a state's card) is kept as the previous version.

`NAME.pth` with its card `NAME.json` becomes `NAME.prev.pth` with `NAME.prev.json`; one previous version is kept
(a second replacement overwrites it). Every step is atomic: the name always holds a whole file.
"""
import os
import shutil
from collections.abc import Callable

from rwkvray.files.atomic import write_atomically

PREVIOUS_MARK = ".prev"


class NameTaken(FileExistsError):
    """The target exists and the caller did not ask to replace it."""


def previous_path(path: str) -> str:
    """Where the previous version of `path` is kept: NAME.prev.EXT beside NAME.EXT."""
    stem, ext = os.path.splitext(path)
    return stem + PREVIOUS_MARK + ext


def write_new_version(path: str, write: Callable[[str], None], replace: bool, companions: tuple[str, ...] = ()) -> bool:
    """Write `path` by calling write(tmp) on a temp file beside it, then renaming it into place.

    If `path` exists: without `replace`, raise NameTaken before anything is written; with it, once `write` has
    succeeded (a check inside it that raises leaves everything as it was), keep the current file and each
    companion as their previous versions. A companion that does not exist drops its stale previous version, so
    the previous pair stays consistent. The caller writes the new companions afterwards. Returns whether a
    previous version was kept."""
    exists = os.path.exists(path)
    if exists and not replace:
        raise NameTaken(path)

    def write_then_keep_previous(tmp: str) -> None:
        write(tmp)
        if exists:
            for original in (path, *companions):
                keep_previous(original)

    write_atomically(path, write_then_keep_previous)
    return exists


def keep_previous(path: str) -> None:
    """Copy `path` to its previous-version name (atomically), or remove that copy when `path` is gone."""
    previous = previous_path(path)
    if os.path.exists(path):
        write_atomically(previous, lambda tmp: shutil.copyfile(path, tmp))
    elif os.path.exists(previous):
        os.remove(previous)

"""Write files so that a crash never leaves half of one: write beside the target, then rename."""
import contextlib
import os
import tempfile
from collections.abc import Callable


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temp path in the target's folder; on success it replaces `path`, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Run write(tmp) on a temp file next to `path`, then move it into place."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_bytes_atomically(path: str, payload: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)

"""Write files so that a crash never leaves half of one: write beside the target, then rename.

The temp file is created the way a plain `open(path, "w")` creates a file (mode 0o666 less the umask), so the
result is readable by a service or another user exactly when a plain write would be (0644 under umask 022).
"""
import contextlib
import os
import secrets
import stat
from collections.abc import Callable


def create_temp_beside(path: str) -> str:
    """A new empty file next to `path`, with a name no other writer picks, created under the umask."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temp path in the target's folder; on success it replaces `path`, on error it is removed."""
    tmp = create_temp_beside(path)
    plain_mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        yield tmp
        os.chmod(tmp, plain_mode)  # some writers (safetensors) replace the file with one of their own, 0600
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

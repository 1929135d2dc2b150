"""Node-local copies of inputs named by URI (`s3://`, `gs://`): each node downloads each object once.

`RWKVRAY_CACHE_DIR` names the cache (default `$XDG_CACHE_HOME/rwkvray`, else `~/.cache/rwkvray`, as HF_HOME
does). An entry is one folder keyed by its objects' URIs, sizes and modification times: a changed object is a
new entry. A file lock lets one process per node download while the others wait for it; each object goes to a
temp file renamed into place, and `entry.json` (with each file's sha256, computed while downloading) is written
last, so a killed download leaves no entry and the next caller redoes it from the start.
"""
import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import sys
import time

from rwkvray.files.atomic import write_bytes_atomically
from rwkvray.files.storage import filesystem, is_uri

CACHE_ENV = "RWKVRAY_CACHE_DIR"
ENTRY = "entry.json"
PART = ".part"
CHUNK_BYTES = 8 << 20
PROGRESS_EVERY_S = 10.0


def cache_dir() -> str:
    folder = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "rwkvray")
    return os.path.abspath(os.path.expanduser(folder))


def object_size(uri: str) -> int:
    """The object's size; FileNotFoundError when it does not exist, OSError when the store cannot be read."""
    return _object_info(uri)[0]


def _object_info(uri: str) -> tuple[int, int]:
    import pyarrow.fs
    fs, inner = filesystem(uri)
    info = fs.get_file_info(inner)
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"not found: {uri}" if info.type == pyarrow.fs.FileType.NotFound
                                else f"not a file: {uri}")
    return info.size, info.mtime_ns or 0


def local_copy(path: str) -> str:
    """A local file with the content of `path`: the path itself when it is local, else its cached copy."""
    return local_copies([path])[0] if is_uri(path) else path


def local_prefix(prefix: str, suffixes: tuple[str, ...] = (".bin", ".idx")) -> str:
    """A binidx-style prefix whose files (prefix + each suffix) are local, side by side in one entry."""
    if not is_uri(prefix):
        return prefix
    return local_copies([prefix + suffix for suffix in suffixes])[0].removesuffix(suffixes[0])


def local_copies(uris: list[str]) -> list[str]:
    """Download the objects once per node (one entry folder for all of them); their local paths."""
    from filelock import FileLock
    objects = [(uri, *_object_info(uri)) for uri in uris]
    key = hashlib.sha256(json.dumps(objects).encode()).hexdigest()[:24]
    folder = os.path.join(cache_dir(), key)
    targets = [os.path.join(folder, posixpath.basename(uri)) for uri in uris]
    os.makedirs(cache_dir(), exist_ok=True)
    with FileLock(folder + ".lock"):
        if not os.path.isfile(os.path.join(folder, ENTRY)):
            shutil.rmtree(folder, ignore_errors=True)  # what a killed download left
            os.makedirs(folder)
            files = {os.path.basename(target): _download(uri, size, mtime_ns, target)
                     for (uri, size, mtime_ns), target in zip(objects, targets)}
            record = json.dumps({"files": files}, indent=2) + "\n"
            write_bytes_atomically(os.path.join(folder, ENTRY), record.encode())
    return targets


def _download(uri: str, size: int, mtime_ns: int, target: str) -> dict:
    fs, inner = filesystem(uri)
    part = target + PART
    digest = hashlib.sha256()
    print(f"rwkvray cache: downloading {uri} ({_human(size)}) to {target}", file=sys.stderr, flush=True)
    started = last_shown = time.monotonic()
    done = 0
    with fs.open_input_stream(inner) as source, open(part, "wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if time.monotonic() - last_shown >= PROGRESS_EVERY_S:
                last_shown = time.monotonic()
                _show_progress(uri, done, size, last_shown - started)
        out.flush()
        os.fsync(out.fileno())
    if done != size:
        raise OSError(f"{uri}: read {done} bytes of {size} (the object changed while downloading?)")
    os.replace(part, target)
    return {"uri": uri, "size": size, "mtime_ns": mtime_ns, "sha256": digest.hexdigest()}


def _show_progress(uri: str, done: int, size: int, seconds: float) -> None:
    rate = done / max(seconds, 1e-9)
    print(f"rwkvray cache: {uri}: {_human(done)} of {_human(size)} ({100 * done / max(size, 1):.0f}%), "
          f"{_human(rate)}/s", file=sys.stderr, flush=True)


def _human(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def recorded_sha256(path: str) -> str | None:
    """The sha256 kept in a cache entry for its file `path` (None when `path` is no cached file)."""
    entry = os.path.join(os.path.dirname(os.path.abspath(path)), ENTRY)
    try:
        with open(entry, encoding="utf-8") as f:
            record = json.load(f)["files"][os.path.basename(path)]
        return record["sha256"] if os.path.getsize(path) == record["size"] else None
    except (OSError, KeyError, TypeError, ValueError):
        return None


def entries() -> list[dict]:
    """Every complete entry's files: {"uri", "size", "path"}, in URI order."""
    root = cache_dir()
    found = []
    for key in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, key, ENTRY), encoding="utf-8") as f:
                files = json.load(f)["files"]
        except (OSError, KeyError, ValueError):
            continue
        found += [{"uri": record["uri"], "size": record["size"], "path": os.path.join(root, key, name)}
                  for name, record in files.items()]
    return sorted(found, key=lambda item: item["uri"])


def clear() -> tuple[int, int]:
    """Remove every entry (complete or not) and its lock file; (entry folders removed, bytes freed)."""
    from filelock import FileLock
    root = cache_dir()
    removed = freed = 0
    for key in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, key)
        if not os.path.isdir(folder):
            continue
        with FileLock(folder + ".lock"):  # not while a download into it runs
            freed += sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
            shutil.rmtree(folder)
        with contextlib.suppress(FileNotFoundError):
            os.remove(folder + ".lock")
        removed += 1
    return removed, freed

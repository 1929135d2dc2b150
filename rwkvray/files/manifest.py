"""A checkpoint's manifest: every file's size and sha256, written after all the files are in storage.

A checkpoint is intact when its manifest is there and every file it lists is there with its size (the quick
check, on storage: no download) and its checksum (the full check, on the local copy a worker loads). A full disk,
a killed upload or a deleted file fails one of them; so does a checkpoint whose manifest was never written.
"""
import hashlib
import json
import os
import posixpath

MANIFEST = "manifest.json"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train (checkpoint_<time>) and Ray Tune (checkpoint_<index>) alike
CHUNK = 2**20


def local_entries(folder: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under a local folder (the manifest excepted)."""
    entries = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != MANIFEST:
                entries[relative] = {"size": os.path.getsize(path), "sha256": sha256_of(path)}
    return entries


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_bytes(entries: dict[str, dict]) -> bytes:
    return json.dumps({"files": dict(sorted(entries.items()))}, indent=1).encode()


def parse_manifest(payload: bytes | None) -> tuple[dict[str, dict] | None, str | None]:
    """(its entries, None), or (None, what is wrong with it)."""
    if payload is None:
        return None, f"no {MANIFEST} (the checkpoint was not completely written)"
    try:
        files = json.loads(payload)["files"]
        if all(isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values()):
            return files, None
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None, f"{MANIFEST} is unreadable"


def storage_problem(fs, folder: str) -> str | None:
    """The quick check of a checkpoint folder on a pyarrow filesystem: what is wrong with it, or None."""
    import pyarrow.fs
    manifest, problem = parse_manifest(_read(fs, posixpath.join(folder, MANIFEST)))
    if problem:
        return problem
    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, recursive=True))
    sizes = {posixpath.relpath(info.path, folder): info.size for info in infos if info.type == pyarrow.fs.FileType.File}
    return _mismatch(manifest, sizes)


def local_problem(folder: str) -> str | None:
    """The full check of a local copy: sizes and sha256 checksums against its manifest."""
    path = os.path.join(folder, MANIFEST)
    payload = open(path, "rb").read() if os.path.isfile(path) else None
    manifest, problem = parse_manifest(payload)
    if problem:
        return problem
    found = local_entries(folder)
    mismatch = _mismatch(manifest, {name: entry["size"] for name, entry in found.items()})
    if mismatch:
        return mismatch
    for name, entry in sorted(manifest.items()):
        if found[name]["sha256"] != entry["sha256"]:
            return f"{name} does not match its checksum in {MANIFEST}"
    return None


def checkpoint_folders(fs, parent: str) -> list[str]:
    """Names of the checkpoint folders in a run or trial folder, newest first."""
    import pyarrow.fs
    infos = fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    names = [info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory]
    return sorted((name for name in names if name.startswith(CHECKPOINT_PREFIX)), reverse=True)


def _mismatch(manifest: dict[str, dict], sizes: dict[str, int]) -> str | None:
    for name, entry in sorted(manifest.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != entry["size"]:
            return f"{name} has {sizes[name]} bytes, {MANIFEST} says {entry['size']}"
    return None


def _read(fs, path: str) -> bytes | None:
    import pyarrow.fs
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()

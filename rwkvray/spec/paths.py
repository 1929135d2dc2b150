"""Paths in a spec: resolved against the working directory when the spec is loaded, checked to exist.

`ray job submit --working-dir . -- rwkvray run jobs/x.yaml` runs the entrypoint inside the uploaded copy of `.`,
so paths relative to the repository root work there too; output folders are kept out of that copy, which Ray
deletes with the job. A URI (`s3://...`) is kept as written.
"""

from __future__ import annotations

import fnmatch
import os
import re

from pydantic import ValidationInfo

from rwkvray.files.storage import is_uri

RAY_PACKAGE = re.compile(r"/runtime_resources/working_dir_files/[^/]+")


def checking_files(info: ValidationInfo) -> bool:
    """False while `rwkvray validate --no-check-files` loads a spec whose files live on a cluster's disk (the
    loader's validation context says so)."""
    return (info.context or {}).get("check_files", True)


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def folder_or_uri(path: str) -> str:
    """A local folder made absolute, or a URI (s3://, gs://) as written."""
    return path if is_uri(path) else absolute(path)


def ray_job_package() -> str | None:
    """The uploaded working dir, when this process is a `ray job submit --working-dir` entrypoint (Ray unpacks
    it under runtime_resources/working_dir_files/ and deletes it with the job)."""
    match = RAY_PACKAGE.search(os.getcwd())
    return os.getcwd()[: match.end()] if match else None


def gitignore_rule(path: str, package: str) -> str | None:
    """The .gitignore line of the uploaded working dir that names `path`: Ray's upload leaves those files out."""
    try:
        with open(os.path.join(package, ".gitignore")) as f:
            rules = [line.strip() for line in f if line.strip() and not line.startswith(("#", "!"))]
    except OSError:
        return None
    parts = os.path.relpath(path, package).split(os.sep)
    for rule in rules:
        pattern = rule.strip("/")
        if rule.startswith("/"):
            candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        else:
            candidates = parts
        if any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates):
            return rule
    return None


def existing_file(path: str, info: ValidationInfo) -> str:
    resolved = absolute(path)
    if not checking_files(info):
        return resolved
    if os.path.isdir(resolved):
        raise ValueError(f"is a folder, not a file: {resolved}")
    if not os.path.isfile(resolved):
        package = ray_job_package()
        rule = package and resolved.startswith(package + os.sep) and gitignore_rule(resolved, package)
        if rule:
            raise ValueError(f"file not found: {resolved} (Ray's --working-dir upload skips what .gitignore names, "
                             f"and {rule!r} names this file: put it on storage every node reads and give its "
                             "absolute path)")
        raise ValueError(f"file not found: {resolved}")
    return resolved


def input_file(path: str, info: ValidationInfo) -> str:
    """An input the workers read: a local file that exists, or a URI of an object that exists (each node
    downloads it into its cache, rwkvray/files/cache.py)."""
    if not is_uri(path):
        return existing_file(path, info)
    if checking_files(info):
        existing_object(path)
    return path


def existing_object(uri: str) -> None:
    from rwkvray.files.cache import object_size
    try:
        object_size(uri)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    except OSError as err:
        raise ValueError(f"cannot read {uri}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def data_path(path: str, data_type: str | None, info: ValidationInfo) -> str:
    """A data file must exist (sft data may be a save_to_disk folder instead); a binidx prefix (with or without
    .bin/.idx) needs both its .bin and .idx. A URI names an object (a binidx prefix: two objects)."""
    if is_uri(path):
        return uri_data_path(path, data_type, info)
    if data_type == "sft" and os.path.isdir(absolute(path)):
        return absolute(path)
    if data_type != "binidx":
        resolved = absolute(path)
        binidx_instead = not os.path.exists(resolved) and os.path.isfile(resolved + ".bin")
        if data_type == "jsonl" and checking_files(info) and binidx_instead:
            raise ValueError(f"file not found: {resolved} ({resolved}.bin exists: set data.type: binidx)")
        return existing_file(path, info)
    prefix = absolute(path)
    for extension in (".bin", ".idx"):
        prefix = prefix.removesuffix(extension)
    for needed in (prefix + ".bin", prefix + ".idx"):
        if checking_files(info) and not os.path.isfile(needed):
            raise ValueError(f"binidx file not found: {needed}")
    return prefix


def uri_data_path(uri: str, data_type: str | None, info: ValidationInfo) -> str:
    if data_type != "binidx":
        return input_file(uri, info)
    prefix = uri
    for extension in (".bin", ".idx"):
        prefix = prefix.removesuffix(extension)
    if checking_files(info):
        for needed in (prefix + ".bin", prefix + ".idx"):
            try:
                existing_object(needed)
            except ValueError as err:
                raise ValueError(f"binidx {err}") from None
    return prefix


def durable_folder(path: str) -> str:
    """An output folder. Inside a Ray job's uploaded working dir, a relative one would vanish with the job: it is
    resolved against ~/rwkvray instead (./runs -> ~/rwkvray/runs)."""
    if is_uri(path):
        return path
    if ray_job_package() and not os.path.isabs(os.path.expanduser(path)):
        return absolute(os.path.join("~", "rwkvray", path))
    return absolute(path)

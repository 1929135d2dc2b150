"""Reaching flash-linear-attention's kernels, for WKV-7 and WKV-6 alike: one clear line when fla is missing or
too old."""
import importlib
import inspect

from rwkvray.errors import UserError


def import_chunk(op: str):
    """`fla.ops.<op>.chunk_<op>` and its parameters; one clear line if fla is not installed."""
    try:
        chunk = getattr(importlib.import_module(f"fla.ops.{op}"), f"chunk_{op}")
    except (ImportError, AttributeError) as error:
        raise UserError(f"WKV op 'fla' needs flash-linear-attention (pip install fla-core>=0.6.0): {error}") from None
    return chunk, inspect.signature(chunk).parameters


def refuse_missing(op: str, missing: list):
    if missing:
        raise UserError(f"fla {installed_version()} has a chunk_{op} without {', '.join(missing)}; "
                        f"install fla-core>=0.6.0")


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for package in ("fla-core", "flash-linear-attention"):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return "(unknown version)"

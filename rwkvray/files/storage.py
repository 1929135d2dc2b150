"""Storage: a local/shared folder or a URI (s3://, gs://) that pyarrow opens, for `run.storage_path` and for
the states_dir of Serve and `run.publish`.

Workers write run outputs here and the driver reads them back from here: no file passes through a worker's
own disk. Serve keeps its states here, so a restart, another replica or another node sees each of them.
S3 endpoint and credentials come from the standard AWS_* environment variables.
"""
import os
import posixpath
import shutil

from rwkvray.files.atomic import write_atomically, write_bytes_atomically

AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
           "AWS_SESSION_TOKEN", "AWS_REGION")


def is_uri(path: str) -> bool:
    return "://" in path


def run_dir(spec) -> str:
    """storage_path/name: where Ray keeps the run's checkpoints and rwkvray its outputs."""
    return join(spec.run.storage_path, spec.run.name)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def filesystem(path: str):
    import pyarrow.fs
    if not is_uri(path):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.FileSystem.from_uri(path)


def write_bytes(path: str, payload: bytes) -> None:
    """Whole-file write: atomic rename on disk; an object store's put is atomic by itself."""
    if not is_uri(path):
        write_bytes_atomically(path, payload)
        return
    fs, inner = filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(payload)


def read_bytes(path: str) -> bytes | None:
    """The file's content, or None when it does not exist."""
    import pyarrow.fs
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read()


def is_file(path: str) -> bool:
    import pyarrow.fs
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pyarrow.fs.FileType.File


def copy(source: str, target: str) -> None:
    """Copy a file whole: atomic rename on disk; a server-side copy (one whole object) in a bucket."""
    if not is_uri(target):
        write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
        return
    fs, inner = filesystem(source)
    fs.copy_file(inner, filesystem(target)[1])


def delete(path: str) -> None:
    """Remove a file; nothing to do when it does not exist."""
    import pyarrow.fs
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.File:
        fs.delete_file(inner)


def list_files(folder: str) -> list[str]:
    """Names of the plain files directly in `folder` (none if it does not exist)."""
    import pyarrow.fs
    fs, inner = filesystem(folder)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=False))
    return sorted(info.base_name for info in infos if info.type == pyarrow.fs.FileType.File)


def unreachable(folder: str) -> str | None:
    """Why the bucket of a URI folder cannot be used from here (None when it can be listed): a missing bucket,
    refused credentials, an endpoint that does not answer."""
    import pyarrow
    import pyarrow.fs
    try:
        fs, inner = filesystem(folder)
        bucket = inner.split("/")[0]
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            return f"the bucket {bucket!r} does not exist"
        fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    except (OSError, pyarrow.ArrowException, ValueError) as err:
        return str(err).strip().splitlines()[0]
    return None


def aws_env() -> dict[str, str]:
    """The AWS_* variables of this process, for the workers' runtime_env."""
    return {name: os.environ[name] for name in AWS_ENV if name in os.environ}

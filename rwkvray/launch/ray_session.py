"""Join the Ray cluster named by --address / RAY_ADDRESS, or start a local instance (the embedded default)."""
import contextlib
import os


@contextlib.contextmanager
def ray_session(address: str | None = None):
    """Ray for the length of one command; a caller that already joined Ray keeps its connection."""
    import ray
    if ray.is_initialized():
        yield
        return
    # "local" starts a fresh instance even when another one runs on this machine
    from rwkvray.storage import aws_env
    aws = aws_env()  # an s3:// storage_path: Ray Train's controller and workers read the bucket too
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", configure_logging=False,
             runtime_env={"env_vars": aws} if aws else None)
    try:
        yield
    finally:
        # explicitly, before interpreter exit: otherwise Ray Train's placement-group cleaner races the
        # shutting-down GCS and prints a traceback
        ray.shutdown()

"""Connect to the Ray cluster named by --address / RAY_ADDRESS, or start a local instance (the embedded default)."""
import os


def connect(address: str | None = None):
    import ray
    if ray.is_initialized():
        return
    # "local" starts a fresh instance even when another one runs on this machine
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", configure_logging=False)

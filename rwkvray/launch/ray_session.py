"""Connect to the Ray cluster named by --address / RAY_ADDRESS, or start a local instance (the embedded default)."""
import os


def connect(address: str | None = None):
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # the driver's working directory holds the spec's relative paths; workers get absolute ones
    ray.init(address=address, log_to_driver=True, configure_logging=False)

"""Join the Ray cluster named by --address / RAY_ADDRESS, or start a local instance (the embedded default).

A cluster address is probed before `ray.init`: Ray itself retries an address where nothing answers for many
minutes, printing "Failed to connect to GCS" warnings, where a user wants one line naming the address.
"""
import contextlib
import logging
import os
import signal
import socket
import threading
import time

from rwkvray.errors import UserError

PROBE_SECONDS = 20  # how long an address that neither answers nor refuses is retried
# Ray Train's controller starts a node-drain watcher whose creation logs a core_worker error line (its constructor
# arguments sit in the object store while it may restart, ray-project/ray#53727); rwkvray resumes from
# checkpoints and does not use the drain notices
QUIET_CONTROLLER = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Ray finds the GCS of the job's own instance through RAY_ADDRESS or, without it, by looking for GCS processes on the
# machine: Ray Train's PlacementGroupCleaner polls the state API that way (ray.dashboard.utils
# .get_address_for_submission_client), and with another instance on the machine it fails ("Found multiple active Ray
# instances") or, when that one was started by `ray start`, asks it and may remove the run's placement group
GCS_PORT_VAR = "RAY_GCS_SERVER_PORT"  # the port a head started by ray.init gives its GCS (ray._private.node)
START_HINT = "start a head there with `ray start --head`, or leave out the address to use a local Ray instance"


class Terminated(KeyboardInterrupt):
    """SIGTERM, the way supervisors and container runtimes stop a process: it takes Ctrl-C's path (the run stops
    and resumes from its last checkpoint; Serve stops), and the command says which signal it was."""


def raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def stopping_on_sigterm():
    """SIGTERM raises Terminated in the main thread while inside. Ray's core worker installs a handler of its own
    at ray.init, which would end the process at once, past every cleanup: enter this after ray.init."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def owns_ray(address: str | None) -> bool:
    """Whether this command starts (and ends) a Ray instance of its own rather than joining a cluster."""
    return resolve_address(address)[0] == "local"


def worker_env(use_gpu: bool) -> dict:
    """Environment variables for the processes that train: the S3 endpoint and keys of an s3:// storage_path,
    and DeepSpeed's CPU accelerator (gloo collectives) when they train on CPUs."""
    from rwkvray.files.storage import aws_env
    return {**aws_env(), **({} if use_gpu else {"DS_ACCELERATOR": "cpu"})}


@contextlib.contextmanager
def ray_session(address: str | None = None, env_vars: dict | None = None, num_cpus: int | None = None):
    """Ray for the length of one command; a caller that already joined Ray keeps its connection. `env_vars` go
    to every Ray process of the job (runtime_env), with the S3 settings an s3:// storage_path needs and
    QUIET_CONTROLLER. `num_cpus` sizes a local instance (default: every core); a cluster keeps its own."""
    import ray
    if ray.is_initialized():
        yield
        return
    # "local" starts a fresh instance even when another one runs on this machine
    target, named_by = resolve_address(address)
    if target != "local":
        check_reachable(target, named_by)
    from rwkvray.files.storage import aws_env
    env = {**aws_env(), **QUIET_CONTROLLER, **(env_vars or {})}  # Ray Train's controller reads an s3:// bucket too
    gcs_port = (os.environ.get(GCS_PORT_VAR) or free_port()) if target == "local" else None
    if gcs_port:  # the job's processes know their own instance, whatever else runs on this machine
        env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    try:
        local_size = {"num_cpus": num_cpus} if target == "local" and num_cpus else {}
        with environ_set(GCS_PORT_VAR, gcs_port):
            ray.init(address=target, configure_logging=False, runtime_env={"env_vars": env}, **local_size)
    except ConnectionError as err:
        raise UserError(f"{named_by}: cannot join a Ray cluster ({first_line(err)}); {START_HINT}") from None
    try:
        with stopping_on_sigterm():
            yield
    finally:
        # explicitly, before interpreter exit: otherwise Ray Train's placement-group cleaner races the
        # shutting-down GCS and prints a traceback
        ray.shutdown()


def free_port() -> int:
    """A port nothing listens on now (Ray picks its other local ports the same way)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def environ_set(name: str, value):
    """os.environ[name] = str(value) inside (nothing when value is None); the previous value is restored."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = str(value)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def off_main_thread(drive):
    """Call `drive` (Ray Train's fit, Tune's) in a thread and wait for it, so that Ctrl-C reaches the caller as
    a KeyboardInterrupt: leaving ray_session then ends the job, and the run resumes from its checkpoints. In the
    main thread, Ray Train and Tune install SIGINT handlers of their own, which end the process with status 1
    (Train) or hand back a half-finished sweep as if it were done (Tune)."""
    outcome = {}

    def call():
        try:
            outcome["value"] = drive()
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=call, name="ray-driver", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        for name in ("ray", "ray.tune", "ray.train"):  # the abandoned thread's complaints as Ray stops
            logging.getLogger(name).setLevel(logging.CRITICAL)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def resolve_address(address: str | None) -> tuple[str, str]:
    """(address for ray.init, how the user named it: `--address X` or `RAY_ADDRESS=X`)."""
    if address:
        return address, f"--address {address}"
    from_env = os.environ.get("RAY_ADDRESS")
    if from_env:
        return from_env, f"RAY_ADDRESS={from_env}"
    return "local", "local Ray"


def check_reachable(address: str, named_by: str) -> None:
    """Refuse at once an address that is malformed, a dashboard URL, or where nothing listens."""
    if address == "auto":
        address = local_cluster_address(named_by)
        named_by += f" (the head Ray finds on this machine: {address})"
    if address.startswith(("http://", "https://")):
        raise UserError(f"{named_by}: that is a dashboard URL (for `ray job submit`); rwkvray joins the cluster "
                        "itself: give the head's HOST:PORT (port 6379 by default)")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{named_by}: expected HOST:PORT of a Ray head, for example 10.0.0.5:6379")
    wait_for_listener(host.strip("[]"), int(port), named_by)


def wait_for_listener(host: str, port: int, named_by: str) -> None:
    """Return once something accepts a connection at host:port; a refusal or an unknown host fails at once."""
    deadline = time.monotonic() + PROBE_SECONDS
    while True:
        try:
            wait = min(5.0, max(deadline - time.monotonic(), 1.0))
            socket.create_connection((host, port), timeout=wait).close()
            return
        except socket.gaierror:
            raise UserError(f"{named_by}: unknown host {host}") from None
        except ConnectionRefusedError:
            raise UserError(f"{named_by}: nothing listens there (connection refused); {START_HINT}") from None
        except OSError as err:
            if time.monotonic() > deadline:
                raise UserError(f"{named_by}: no answer in {PROBE_SECONDS} s ({err.strerror or err}); "
                                f"{START_HINT}") from None
            time.sleep(1)


def local_cluster_address(named_by: str) -> str:
    """What "auto" means to Ray: the head `ray start` last recorded on this machine (the record may be stale)."""
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own lookup, so both agree
    try:
        found = canonicalize_bootstrap_address("auto")
    except Exception as err:
        raise UserError(f"{named_by}: no Ray instance found on this machine ({first_line(err)})") from None
    if not found:
        raise UserError(f"{named_by}: no Ray instance found on this machine; {START_HINT}")
    return found


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]

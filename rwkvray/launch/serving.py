"""The driver side of Serve: `rwkvray serve SPEC.yaml` (`run_server`) and the import path for `serve run` /
`serve deploy` (`app_builder`). Both read the API key here, on the driver, and hand it to the application."""
import contextlib
import logging
import os
import time
from typing import Optional

from rwkvray.errors import UserError
from rwkvray.spec import ServeConfig, ServeSpec, load_spec, spec_from_dict

# Serve's own work beside the model, lighter than Ray's defaults. The model replica's torch threads run in lock
# step, so any CPU another process takes stalls all of them. Measured on a 2-core node under load: the controller's
# 0.1 s loop took 0.09 CPU (0.5 s: 0.02), each Serve process's 0.1 s metric exports 0.01 (1 s: 0.005), and Ray
# actor calls between the proxy, the gateway and the model replica 1.2 ms of CPU per streamed token at 8 streams
# (gRPC: 0.6 ms). A variable set in the environment wins.
SERVE_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
             "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


def read_api_key(config: ServeConfig) -> Optional[str]:
    """The API key from the environment; a configured but unset variable is an error (never serve open)."""
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise UserError(f"serve.api_key_env: the environment variable {config.api_key_env} is not set "
                        "(set it, or remove api_key_env to serve without a key)")
    return key


def serve_env() -> dict:
    return {name: os.environ.get(name, value) for name, value in SERVE_ENV.items()}


def start_serve(host: str, port: int) -> None:
    """Start Serve on the connected cluster, its controller (and the proxies and replicas it starts) with
    `serve_env()`. A controller already running keeps its settings."""
    from ray import serve
    serve.start(http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": serve_env()}})


def app_builder(args: dict):
    """Import path for `serve run` / `serve deploy`: args are the fields of a serve block, or {"spec": PATH}
    naming a job spec with a serve block."""
    from rwkvray.serve.app import build_app
    if set(args) == {"spec"}:
        config = load_spec(args["spec"], kind=ServeSpec).serve
    else:
        config = spec_from_dict({"serve": dict(args)}, "serve app args").serve
    return build_app(config, read_api_key(config))


@contextlib.contextmanager
def dropped_log_line(logger_name: str, start: str):
    """Leave out the log records of `logger_name` whose message begins with `start`, for the block's length."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(start)
    logging.getLogger(logger_name).addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger(logger_name).removeFilter(keep)


def run_server(spec, address: Optional[str] = None) -> None:
    """`rwkvray serve SPEC.yaml`: deploy on the cluster at `address` (or a local Ray), print the URL, and
    serve until Ctrl-C or SIGTERM. On a cluster that outlives this command the application is removed; a local Ray
    instance ends with the command, and its application with it. (A SIGTERM to the process group also reaches
    that instance's GCS and raylet, so asking its Serve controller to delete the app would wait on a GCS that is
    gone.)"""
    from ray import serve

    from rwkvray.launch.ray_session import owns_ray, ray_session
    from rwkvray.serve.app import APP_NAME, build_app
    from rwkvray.serve.proxy_guard import proxy_env
    config = spec.serve
    os.environ.update(proxy_env(config.api_key_env))  # before a local Ray starts: its proxy guards /-/routes
    with ray_session(address):
        app = build_app(config, read_api_key(config))  # after connecting: use_gpu "auto" asks the cluster
        start_serve(config.host, config.port)
        with dropped_log_line("ray.serve", "Connecting to existing Serve app"):  # serve.run starts Serve again
            serve.run(app, name=APP_NAME, route_prefix="/")  # and says our http_options "will not be applied"
        print(f"serving {config.model_name} at http://{config.host}:{config.port}/v1 "
              f"(states from {config.states_dir}); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            if not owns_ray(address):
                serve.delete(APP_NAME)
            print("stopped", flush=True)

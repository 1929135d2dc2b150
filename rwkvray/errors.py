"""User-facing errors: one clear line, no traceback."""


class UserError(Exception):
    """Bad input from the user (a spec, a file, a flag). The CLI prints `error: <message>` and exits 2."""


class RayServeConfigFile(UserError):
    """A Ray Serve config file (applications:, http_options:) given where a job spec belongs."""

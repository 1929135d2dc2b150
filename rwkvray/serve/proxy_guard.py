"""The API key in front of Ray Serve's own `/-/routes`, which Ray's HTTP proxy answers before any application.

Ray 2.58 has no switch to turn that route off; its proxy does wrap every request, `/-/routes` included, in the
Starlette middlewares returned by the function named in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, read when the
proxy starts. `proxy_env(config)` gives the variables the Ray processes need: `rwkvray serve` sets them before it
starts a local Ray; a cluster's nodes need them when they are started (`ray start`), as `serve run` needs them too.
`/-/healthz` stays open: load balancers and KubeRay probe it without a key.
"""
import hmac
import json
import os

ROUTES_PATH = "/-/routes"
KEY_ENV_VAR = "RWKVRAY_API_KEY_ENV"  # names the variable that holds the key, as serve.api_key_env does
CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def proxy_env(api_key_env: str | None) -> dict[str, str]:
    """The environment of Ray's processes for a server whose key is in `api_key_env` (none: nothing to guard)."""
    if api_key_env is None:
        return {}
    return {CALLBACK_VAR: f"{__name__}.middlewares", KEY_ENV_VAR: api_key_env}


def middlewares() -> list:
    """Called by Ray's HTTP proxy when it starts."""
    from starlette.middleware import Middleware
    return [Middleware(RoutesGuard)]


class RoutesGuard:
    """Answers `/-/routes` with 401 unless the request carries the key (pure ASGI: it sees every request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == ROUTES_PATH and not self.authorized(scope):
            body = json.dumps({"error": {"message": "missing or incorrect API key (send `Authorization: Bearer "
                                                    "<key>`)", "type": "invalid_request_error", "param": None,
                                         "code": "invalid_api_key"}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def authorized(scope) -> bool:
        key = os.environ.get(os.environ.get(KEY_ENV_VAR, ""), "")
        if not key:  # a proxy started without the key's variable answers nobody
            return False
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

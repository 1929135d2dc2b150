"""The state playground: a static page (rwkvray/serve/playground/) served by the Gateway.

The page is plain HTML/JS/CSS shipped as package data: no build step, and a Content-Security-Policy that lets
it reach only its own origin, so it never loads anything from the network. It talks to the same
OpenAI-compatible API as any client, with the key the user types (kept in the tab's sessionStorage).
"""
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response

from rwkvray.serve.api import not_found

# app.js holds the shared parts and the wiring; compare.js, states.js, blend.js and evaluate.js one panel each
PAGE_FILES = {"index.html": "text/html", "style.css": "text/css", "app.js": "text/javascript",
              "compare.js": "text/javascript", "states.js": "text/javascript", "blend.js": "text/javascript",
              "evaluate.js": "text/javascript"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def page_file(name: str) -> Response:
    if name not in PAGE_FILES:
        raise not_found(f"no playground file '{name}'", "not_found")
    body = (files("rwkvray.serve") / "playground" / name).read_bytes()
    return Response(body, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)


def add_playground(app: FastAPI) -> None:
    """Serve the page at /playground (and send / there). The page itself is public; its API calls are not."""

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground")

    @app.get("/playground", include_in_schema=False)
    async def playground() -> Response:
        return page_file("index.html")

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_file(name: str) -> Response:
        return page_file(name)


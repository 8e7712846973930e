"""The tenants' web page: `/ui/`, a static page (gateway/static/: one HTML file, one script, one stylesheet) that
calls the JSON API from the browser with the tenant's token.

The server side holds no session: the page keeps the token in the tab's sessionStorage and sends it as
`Authorization: Bearer` on each API call (never in a URL or a cookie, so it is neither logged nor sent by other
sites' requests). Everything the API returns is written into the page as text (the script builds nodes, never
HTML strings), and the Content-Security-Policy below allows only the page's own script and stylesheet, so tenant
text that slipped through as markup could still not run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

STATIC = Path(__file__).parent / "static"
# name -> media type: the only files served, read once at start-up.
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "app.css": "text/css; charset=utf-8"}
# Nothing from another origin, no inline script or style (the chart is SVG built by app.js, styled by app.css).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def page_routes() -> APIRouter:
    """`/` (a redirect), `/ui/` and the page's own files; left out of the OpenAPI schema, which is the API's."""
    router = APIRouter(include_in_schema=False)
    contents = {name: (STATIC / name).read_bytes() for name in FILES}

    def serve(name: str) -> Response:
        return Response(contents[name], media_type=FILES[name], headers=HEADERS)

    @router.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("ui/")  # relative: right under a reverse proxy's prefix (--root-path) too

    @router.get("/ui/")
    def index() -> Response:
        return serve("index.html")

    @router.get("/ui/{name}")
    def asset(name: str) -> Response:
        if name not in FILES:
            return Response("not found", status_code=404, media_type="text/plain", headers=HEADERS)
        return serve(name)

    return router

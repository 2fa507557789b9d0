"""The dashboard's files, served on plain HTTP by the server itself (README "Dashboard").

`web/` holds plain HTML, CSS and JavaScript: no build step, nothing from a CDN, no web font, so
an offline deployment shows the same page. `/` is `web/index.html` and every other file of the
folder is `/static/<name>`. The files are read once, when the server starts: a request can
only name one of them, because its path is looked up in a table and never turned into a file
name (no directory traversal to defend against).

Every answer carries a strict Content-Security-Policy: scripts and styles from this server only
(no inline script, no `eval`), connections to this server only (its /client websocket), no
frames, no plugins, no forms. The page inserts what calls say as text, and the policy stops any
markup that got in anyway from running.
"""

from __future__ import annotations

import http
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Response

WEB = Path(__file__).resolve().parent / "web"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",  # a file is only ever what its Content-Type says
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for older browsers
    "Cache-Control": "no-cache",  # revalidate: a new version of the server shows its new page
}


def routes(folder: Path = WEB) -> dict[str, tuple[str, bytes]]:
    """{URL path: (content type, body)} for the folder's files (not its subfolders)."""
    table = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix in CONTENT_TYPES:
            path = "/" if file.name == "index.html" else f"/static/{file.name}"
            table[path] = (CONTENT_TYPES[file.suffix], file.read_bytes())
    return table


class Site:
    """The dashboard's routes; `response(path)` is None for any other path."""

    def __init__(self, folder: Path = WEB):
        self.routes = routes(folder)

    def response(self, path: str) -> Response | None:
        found = self.routes.get(path)
        if found is None:
            return None
        content_type, body = found
        headers = Headers({**HEADERS, "Content-Type": content_type, "Content-Length": str(len(body))})
        return Response(http.HTTPStatus.OK, "OK", headers, body)

"""The dashboard's files on plain HTTP (web.py): the routes, their headers, and attempts to reach
anything else. Requests are written on raw sockets, so no client tidies a path up first."""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import web

ROOT = Path(__file__).resolve().parent.parent


async def http_get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """One GET exactly as written: (status, headers with lower-case names, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines if line)}
    body = await asyncio.wait_for(reader.readexactly(int(fields.get("content-length", 0))), 5)
    writer.close()
    return int(status_line.split(" ")[1]), fields, body


def test_routes_are_index_at_the_root_and_every_other_file_under_static(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / "notes.txt").write_text("not a web file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.js").write_text("2")
    routes = web.routes(tmp_path)
    assert routes == {"/": ("text/html; charset=utf-8", b"<!doctype html>"),
                      "/static/app.js": ("text/javascript; charset=utf-8", b"1")}


async def test_the_page_and_its_files_are_served_with_their_types_and_a_strict_policy(stack):
    files = {"/": "index.html", "/static/app.js": "app.js", "/static/style.css": "style.css",
             "/static/favicon.svg": "favicon.svg"}
    types = {"/": "text/html; charset=utf-8", "/static/app.js": "text/javascript; charset=utf-8",
             "/static/style.css": "text/css; charset=utf-8", "/static/favicon.svg": "image/svg+xml"}
    for path, name in files.items():
        status, headers, body = await http_get(stack.port, path)
        assert status == 200 and body == (ROOT / "web" / name).read_bytes(), path
        assert headers["content-type"] == types[path]
        assert headers["x-content-type-options"] == "nosniff"
        policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"  # no inline script, no eval
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    status, headers, _ = await http_get(stack.port, "/static/app.js?v=2")  # a query does not change the file
    assert status == 200 and headers["content-type"].startswith("text/javascript")


TRAVERSALS = ["/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/server.py", "/static/%2e%2e%2fserver.py",
              "/static//etc/passwd", "/static/../../../../etc/passwd", "/..%2f..%2fetc/passwd", "/static/",
              "/static", "/index.html", "/web/app.js", "/static/app.js/", "/static/app.js%00.html",
              "/static/./app.js", "/STATIC/app.js", "/static/\\..\\server.py", "/server.py", "/.env", "/%2e%2e/server.py"]


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_no_path_reaches_a_file_outside_the_table(stack, path):
    status, _, body = await http_get(stack.port, path)
    assert status in (400, 404) and b"import" not in body and b"root:" not in body


def test_the_page_loads_nothing_from_elsewhere_and_has_no_inline_script_or_style():
    """What the policy would block anyway, kept out of the files: a CDN, a web font, inline code."""
    html = (ROOT / "web" / "index.html").read_text()

    class Audit(HTMLParser):
        def __init__(self):
            super().__init__()
            self.problems, self.references = [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.problems += [f"{tag} {name}=" for name in attrs if name.startswith("on") or name == "style"]
            if tag == "script" and "src" not in attrs:
                self.problems.append("inline <script>")
            if tag == "style":
                self.problems.append("<style>")
            self.references += [attrs[name] for name in ("src", "href") if name in attrs]

    audit = Audit()
    audit.feed(html)
    assert audit.problems == []
    assert audit.references and all(ref.startswith("/static/") for ref in audit.references)
    for name in ("index.html", "app.js", "style.css"):
        text = (ROOT / "web" / name).read_text()
        assert not re.search(r"https?://|@import|@font-face|url\(", text), name
    script = (ROOT / "web" / "app.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script

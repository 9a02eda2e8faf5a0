"""The annotation web server: the page and its JSON API, over a `Store` (standard library only).

Routes (all answers JSON except the three page files, which come from static/ by a fixed table --
no path in a URL is ever looked up on disk):

  GET  /  /app.js  /app.css      the page
  GET  /api/next?annotator=NAME  {"item_id", "prompt", "responses": [...], "mode", "k", "scale",
                                  "progress": {"done", "total"}}, or {"done": true, "progress"}
  POST /api/label                {"item_id", "annotator", <answer>} (see answers.py) -> {"ok": true,
                                  "progress"} once the answer is committed

Errors: 400 {"error": "one line"} for bad input (nothing stored), 403 for a missing or wrong token
(or, without a token, a Host header that is not this machine's loopback name), 404 for unknown
paths, 405 for a wrong method, 500 {"error": "internal error"} (traceback on the server's stderr).

Security. Without `token` the server must listen on a loopback address (the CLI enforces it) and
accepts only requests whose Host is a loopback name, which defeats DNS rebinding. With `token`,
every request must carry it: `Authorization: Bearer T`, or the `annotate_token_<port>` cookie
(HttpOnly, SameSite=Strict) that the page gets when it is opened as `/?token=T`, or `?token=T`.
POST bodies must be `application/json` (a cross-site form cannot send that without a CORS
preflight, which this server never grants). Every response carries a Content-Security-Policy
that allows only this origin's script and style, so nothing in an answer or a response text can
run even if it got into the page; the page itself only ever sets text (`textContent`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import sys
import traceback
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ppo_rlhf.feedback.annotate.answers import (AnswerError, check_annotator, check_item_id,
                                                parse_answer)
from ppo_rlhf.feedback.annotate.store import Store

__all__ = ["AnnotateServer", "is_loopback", "is_unspecified", "MAX_BODY"]

MAX_BODY = 64 * 1024
STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/app.css": ("app.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """True for localhost and the loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    """True for the any-address (0.0.0.0, ::): listening on every interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
        self.status = status


class AnnotateServer(ThreadingHTTPServer):
    """A threading HTTP server bound to (host, port) serving `store` (port 0: any free one;
    `server_port` says which). `per_item`: answers wanted per item; `reserve_s`: how long an
    item handed out stays reserved; `token`: required on every request when not None."""

    daemon_threads = True  # an open browser connection does not keep the process alive
    allow_reuse_address = True

    def __init__(self, store: Store, *, host: str = "127.0.0.1", port: int = 0, per_item: int = 1,
                 reserve_s: float = 600.0, token: str | None = None):
        self.store, self.per_item, self.reserve_s, self.token = store, per_item, reserve_s, token
        self.pages = {path: ((STATIC / name).read_bytes(), ctype)
                      for path, (name, ctype) in PAGES.items()}
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host.strip("[]"), port), _Handler)
        self.cookie_name = f"annotate_token_{self.server_port}"

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.server_port}/"


class _Handler(BaseHTTPRequestHandler):
    server: AnnotateServer
    server_version = "ppo-rlhf-annotate"
    sys_version = ""
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: URLs may hold the token and names; errors go to stderr below

    # ---- routing -----------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._set_cookie = False
        self._body_read = False
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            self._authorise(query)
            if url.path == "/api/next":
                self._only(method, "GET")
                return self._json(200, self._next(query))
            if url.path == "/api/label":
                self._only(method, "POST")
                return self._json(200, self._label())
            if url.path in self.server.pages:
                self._only(method, "GET")
                return self._page(url.path)
            raise ApiError(404, f"no such page: {url.path[:200]}")
        except ApiError as e:
            self._json(e.status, {"error": str(e)})
        except AnswerError as e:
            self._json(400, {"error": " ".join(str(e).split())})
        except ConnectionError:
            self.close_connection = True  # the client went away; nothing to answer
        except Exception:  # noqa: BLE001 -- a bug: answer 500, keep serving, say why on stderr
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": "internal error"})

    @staticmethod
    def _only(method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(405, f"use {allowed} here, not {method}")

    def _authorise(self, query: dict[str, list[str]]) -> None:
        token = self.server.token
        if token is None:
            host = self.headers.get("Host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                raise ApiError(403, "this server answers only requests for its loopback address")
            return
        given = []
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[len("Bearer "):].strip())
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(self.server.cookie_name)
        except CookieError:
            morsel = None
        if morsel is not None:
            given.append(morsel.value)
        in_query = query.pop("token", [])
        given += in_query
        if not any(hmac.compare_digest(g.encode(), token.encode()) for g in given):
            raise ApiError(403, "missing or wrong token")
        self._set_cookie = any(hmac.compare_digest(g.encode(), token.encode()) for g in in_query)

    # ---- the API -----------------------------------------------------------------------------
    def _next(self, query: dict[str, list[str]]) -> dict[str, Any]:
        names = query.get("annotator", [])
        if len(names) != 1:
            raise ApiError(400, "give exactly one ?annotator=NAME")
        annotator = check_annotator(names[0])
        s = self.server
        item = s.store.next_item(annotator, per_item=s.per_item, reserve_s=s.reserve_s)
        progress = s.store.progress(annotator, per_item=s.per_item)
        common = {"mode": s.store.mode, "k": s.store.k, "scale": s.store.scale,
                  "progress": progress}
        if item is None:
            return {"done": True, **common}
        return {"item_id": item.id, "prompt": item.prompt, "responses": item.shown, **common}

    def _label(self) -> dict[str, Any]:
        body = self._read_json()
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        for key in ("item_id", "annotator"):
            if key not in body:
                raise ApiError(400, f'"{key}" is missing')
        item_id = check_item_id(body["item_id"])
        annotator = check_annotator(body["annotator"])
        s = self.server
        answer = parse_answer(body, s.store.mode, s.store.k, s.store.scale)
        s.store.record(item_id, annotator, answer)  # committed (fsynced) when this returns
        return {"ok": True, "progress": s.store.progress(annotator, per_item=s.per_item)}

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(400, "Content-Length is missing or invalid") from None
        if not 0 <= length <= MAX_BODY:
            raise ApiError(400, f"the body must be at most {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        self._body_read = True
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(400, "the body must be sent as Content-Type: application/json")
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"malformed JSON: {e}") from None

    def _drain(self) -> None:
        """Read an unread request body (up to 1 MiB) before answering: closing a socket with
        unread data makes the kernel send a reset, which can destroy the error reply."""
        if self._body_read:
            return
        self._body_read = True
        try:
            left = min(int(self.headers.get("Content-Length", "0")), 1 << 20)
        except ValueError:
            return
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)

    # ---- responses ---------------------------------------------------------------------------
    def _headers(self, status: int, ctype: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        if self._set_cookie:
            self.send_header("Set-Cookie", f"{self.server.cookie_name}={self.server.token}; "
                                           f"Path=/; HttpOnly; SameSite=Strict")
        self.end_headers()

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        if status >= 400:
            self._drain()
            self.close_connection = True
        self._headers(status, "application/json; charset=utf-8", len(data))
        self.wfile.write(data)

    def _page(self, path: str) -> None:
        data, ctype = self.server.pages[path]
        self._headers(HTTPStatus.OK, ctype, len(data))
        self.wfile.write(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")

"""The annotation web server: the page and its JSON API, over a `Store` (standard library only).

Routes (all answers JSON except the three page files, which come from static/ by a fixed table --
no path in a URL is ever looked up on disk):

  GET  /  /app.js  /app.css      the page
  GET  /api/next?annotator=NAME  {"item_id", "prompt", "responses": [...], "mode", "k", "scale",
                                  "progress": {"done", "total"}}, or {"done": true, "progress"}
  POST /api/label                {"item_id", "annotator", <answer>} (see answers.py) -> {"ok": true,
                                  "progress"} once the answer is committed
  POST /api/undo                 {"item_id", "annotator"}: take back that annotator's latest answer
                                  or skip (only while it is their latest); the item is reserved
                                  for them again and comes next -> {"ok": true, "progress"}

progress: {"done": items answered (skips not counted), "skipped", "total": done + items still open
to this annotator}.

Errors, all JSON {"error": "one line"} with the security headers below: 400 for bad input (nothing
stored; a malformed request line or header too), 403 for a missing or wrong token (or, without a
token, a Host header that is not this machine's loopback name; the page's own paths get a short
HTML page saying to open the link with the token), 404 for unknown paths, 405 with `Allow` for a
method a path does not take (HEAD, OPTIONS, TRACE, PUT, DELETE, PATCH, ... included), 413 for a
body over 64 KiB, 500 {"error": "internal error"} for a bug (traceback on the server's stderr).
Requests with a missing or wrong token are counted (`AnnotateServer.refused`) and logged on
stderr (the client's address and the count, never what was sent).

Security. Without `token` the server must listen on a loopback address (the CLI enforces it) and
accepts only requests whose Host is a loopback name, which defeats DNS rebinding. With `token`,
every request must carry it: `Authorization: Bearer T` (the scheme in any case), or the `annotate_token_<port>` cookie
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
import threading
import traceback
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ppo_rlhf.feedback.annotate.answers import AnswerError, check_annotator, check_item_id, parse_answer
from ppo_rlhf.feedback.annotate.store import DamagedDatabase, Store

__all__ = ["AnnotateServer", "is_loopback", "is_unspecified", "MAX_BODY"]

MAX_BODY = 64 * 1024
STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/app.css": ("app.css", "text/css; charset=utf-8")}
ROUTES = {"/api/next": "GET", "/api/label": "POST", "/api/undo": "POST",
          **{path: "GET" for path in PAGES}}
TOKEN_PAGE = (b"<!doctype html><html lang=en><head><meta charset=utf-8><title>ppo-rlhf annotate"
              b"</title></head><body><h1>This annotation server needs its token</h1><p>Open the "
              b"link the person running it gave you: it ends in <code>/?token=...</code>. The page "
              b"then remembers the token (a cookie) until the browser is closed.</p></body></html>")
LISTEN_BACKLOG = 128  # connections waiting to be accepted (socketserver's default 5 overflows)
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
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, store: Store, *, host: str = "127.0.0.1", port: int = 0, per_item: int = 1,
                 reserve_s: float = 600.0, token: str | None = None):
        self.store, self.per_item, self.reserve_s, self.token = store, per_item, reserve_s, token
        self.pages = {path: ((STATIC / name).read_bytes(), ctype)
                      for path, (name, ctype) in PAGES.items()}
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host.strip("[]"), port), _Handler)
        self.cookie_name = f"annotate_token_{self.server_port}"
        self.refused = 0  # requests refused for a missing or wrong token
        self._refused_lock = threading.Lock()

    def count_refused(self, client: str) -> None:
        """Count a request with a missing or wrong token and log it (never the token): every one
        of the first 20, then every 100th."""
        with self._refused_lock:
            self.refused += 1
            n = self.refused
        if n <= 20 or n % 100 == 0:
            print(f"annotate: refused a request with a missing or wrong token from {client} "
                  f"({n} so far)", file=sys.stderr, flush=True)

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

    def __getattr__(self, name: str) -> Any:
        # do_HEAD, do_PUT, do_OPTIONS, ...: every other method gets the same JSON 405 + Allow
        # (http.server would answer 501 in HTML, without the security headers)
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, headers too long, ...) as JSON with
        the security headers, not its HTML page."""
        self._set_cookie = False
        self._body_read = True  # the request could not be parsed: do not read a body
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._json(code, {"error": " ".join(str(message or phrase).split())[:200]})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: URLs may hold the token and names; errors go to stderr below

    # ---- routing -----------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._set_cookie = False
        self._body_read = False
        self._allow: str | None = None
        self._head = method == "HEAD"
        url = None
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            self._authorise(query)
            allowed = ROUTES.get(url.path)
            if allowed is None:
                raise ApiError(404, f"no such page: {url.path[:200]}")
            if method != allowed:
                self._allow = allowed
                raise ApiError(405, f"use {allowed} here, not {method[:20]}")
            if url.path == "/api/next":
                return self._json(200, self._next(query))
            if url.path == "/api/label":
                return self._json(200, self._label())
            if url.path == "/api/undo":
                return self._json(200, self._undo())
            return self._page(url.path)
        except ApiError as e:
            if (e.status == 403 and self.server.token is not None and url is not None
                    and url.path in self.server.pages):  # a person opened the link without it
                return self._send(403, "text/html; charset=utf-8", TOKEN_PAGE)
            self._json(e.status, {"error": str(e)})
        except AnswerError as e:
            self._json(400, {"error": " ".join(str(e).split())})
        except DamagedDatabase as e:
            print(f"annotate: {e}", file=sys.stderr, flush=True)
            self._json(500, {"error": "the annotation database is damaged; see the server's log"})
        except ConnectionError:
            self.close_connection = True  # the client went away; nothing to answer
        except Exception:  # a bug: answer 500, keep serving, say why on stderr
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": "internal error"})

    def _authorise(self, query: dict[str, list[str]]) -> None:
        token = self.server.token
        if token is None:
            host = self.headers.get("Host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                raise ApiError(403, "this server answers only requests for its loopback address")
            return
        given = []
        scheme, _, credentials = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110 11.1)
            given.append(credentials.strip())
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(self.server.cookie_name)
        except CookieError:
            morsel = None
        if morsel is not None:
            given.append(morsel.value)
        in_query = query.pop("token", [])
        given += in_query
        if not any(hmac.compare_digest(g.encode(), token.encode()) for g in given):
            self.server.count_refused(self.client_address[0])
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

    def _item_and_annotator(self) -> tuple[dict[str, Any], int, str]:
        """The JSON object body of an answer or an undo, and its checked item id and annotator."""
        body = self._read_json()
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        for key in ("item_id", "annotator"):
            if key not in body:
                raise ApiError(400, f'"{key}" is missing')
        return body, check_item_id(body["item_id"]), check_annotator(body["annotator"])

    def _label(self) -> dict[str, Any]:
        body, item_id, annotator = self._item_and_annotator()
        s = self.server
        answer = parse_answer(body, s.store.mode, s.store.k, s.store.scale)
        # the quota is checked in the answer's own transaction; committed (fsynced) on return
        s.store.record(item_id, annotator, answer, per_item=s.per_item)
        return {"ok": True, "progress": s.store.progress(annotator, per_item=s.per_item)}

    def _undo(self) -> dict[str, Any]:
        body, item_id, annotator = self._item_and_annotator()
        unknown = sorted(set(body) - {"item_id", "annotator"})
        if unknown:
            raise ApiError(400, f'unknown field "{unknown[0][:40]}"')
        s = self.server
        s.store.undo(item_id, annotator, per_item=s.per_item, reserve_s=s.reserve_s)
        return {"ok": True, "progress": s.store.progress(annotator, per_item=s.per_item)}

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(400, "Content-Length is missing or invalid") from None
        if length < 0:
            raise ApiError(400, "Content-Length is missing or invalid")
        if length > MAX_BODY:
            raise ApiError(413, f"the body must be at most {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        self._body_read = True
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(400, "the body must be sent as Content-Type: application/json")
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"malformed JSON: {str(e)[:200]}") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None

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
        if status == 405 and getattr(self, "_allow", None):
            self.send_header("Allow", self._allow)
        if self._set_cookie:
            self.send_header("Set-Cookie", f"{self.server.cookie_name}={self.server.token}; "
                                           f"Path=/; HttpOnly; SameSite=Strict")
        self.end_headers()

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, "application/json; charset=utf-8",
                   json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def _send(self, status: int, ctype: str, data: bytes) -> None:
        if status >= 400:
            self._drain()
            self.close_connection = True
        self._headers(status, ctype, len(data))
        if not getattr(self, "_head", False) and self.command != "HEAD":  # HEAD: headers only
            self.wfile.write(data)

    def _page(self, path: str) -> None:
        data, ctype = self.server.pages[path]
        self._send(HTTPStatus.OK, ctype, data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")

"""Everything an HTTP request meets before a route: the worker's HTTP protocol, which judges a request from its
request line and headers, and the one ASGI middleware in front of BentoML's app, with the API keys.

The protocol (`LimitedHttpToolsProtocol`): uvicorn's httptools protocol with the limits a public endpoint needs,
and refusals that cost microseconds. BentoML runs each worker on uvicorn, which with httptools sets no limit on the size or number of request
headers and no time limit for reading them: 50 unfinished 4 MB headers held 171 MiB and never timed out,
and malformed framing was answered in plain text. This subclass, which the service puts in place of
uvicorn's "auto" protocol in its workers (`use_in_uvicorn`), answers
- 431 once the request line and headers pass MAX_HEADER_BYTES or MAX_HEADERS, and closes the connection,
  so no more of them is buffered;
- 408 when a request's headers (or a new connection's first request) have not arrived in header_timeout_s;
- 400 as JSON for malformed framing (a bad Content-Length, garbage instead of HTTP);
- for an answer given before the request's body has all arrived (a 401, a 413 from Content-Length, a 404)
  on a connection that then closes, a lingering close as nginx's: the rest of the body is read and dropped
  (at most LINGER_TOTAL_S, LINGER_IDLE_S without data) before the socket closes, because closing a socket
  with unread data sends a reset, and the client, still sending, sees "connection reset" or "broken pipe"
  instead of the answer. Python's urllib sends `Connection: close` with every request, so this is every such
  answer to it;
- 404 for a path no route serves (`HeaderChecks.known_path`, from the route table), so that metrics labelled
  by path, BentoML's among them, never make a series per stray path;
- 503 for a classify request that admission would refuse anyway (service/engine/admission.py), decided from
  the request line and headers alone: the request never reaches BentoML's middleware stack, its body is read
  and dropped, and the answer is held at least the request's latency bound, longer while many are held
  (pacing, service/engine/admission.py: a client that resends at once is slowed to the pace of the
  admitted ones instead of multiplying the load). Under a flood this is most requests, and their cost decides how much CPU is left to answer the others
  (docs/benchmarks.md, "Goodput under a flood").
Every answer here is `{"error": "..."}` like the service's own.

The middleware (`Front`), in order: BentoML clients' API routes are answered by ours (route_table.CLIENT_ROUTES);
the probes are answered for every worker (health.py), before BentoML's own, which say nothing about the other
workers; a route that needs a key and lacks it gets its 401; and an error answer that is not JSON (a
framework's plain-text 404 or 500) becomes `{"error": "<its text>"}` with the same status. At start-up (the
ASGI lifespan) it hands the protocol its HeaderChecks (`header_checks`: the route table, the keys and
admission) through the lifespan state, the one channel uvicorn gives a protocol (`app_state`, which uvicorn
hands to every protocol it makes). The protocol builds on uvicorn's private HttpToolsProtocol, so uvicorn is
pinned to the range tested (pyproject.toml; tests/test_http_limits.py fails loudly on another).

API keys: `Authorization: Bearer <key>` on every route that classifies or tells about models
(TUNESERVE_API_KEY or _FILE), and a key of its own for the management API (TUNESERVE_ADMIN_KEY), whose routes
do not exist without it. The probes, the OpenAPI document and the Swagger UI stay open, and /metrics too unless
TUNESERVE_METRICS_AUTH: which route needs which key is the route table's `access`. A missing or wrong key is a
401 `{"error": ...}` with `WWW-Authenticate: Bearer`. Keys are compared in constant time (hmac.compare_digest)
and never logged: the errors name only the header that was missing or wrong.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import httptools
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from tuneserve.service.config import ServiceConfig
from tuneserve.service.edges.route_table import ADMIN, API, CLIENT_ROUTES, METRICS, RouteTable
from tuneserve.service.engine.admission import Admission
from tuneserve.service.engine.errors import RequestError

# nginx's default large_client_header_buffers (4 x 8 KiB) and Apache's LimitRequestFields: far above what
# any client of this API sends (a few hundred bytes), far below what would cost memory.
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
# nginx's lingering_time and lingering_timeout: a client still sending a refused body gets this long to finish
# (a 20 MB image at 10 Mbit/s takes 16 s) before the connection is cut anyway.
LINGER_TOTAL_S = 30.0
LINGER_IDLE_S = 5.0
DEFAULT_HEADER_TIMEOUT_S = 10.0  # before the service has handed over its settings (TUNESERVE_HEADER_TIMEOUT_S)
# The lifespan state key under which the middleware hands the protocol its HeaderChecks.
STATE_KEY = "tuneserve.header_checks"

@dataclass(frozen=True)
class HeaderChecks:
    """What the protocol decides from a request line and headers, with the service's collaborators."""

    header_timeout_s: float  # a request's headers (or a new connection's first request) must arrive within this
    known_path: Callable[[str], bool]  # whether any route serves the path (route_table.py)
    # (method, path, headers) -> the 503 for a request admission refuses (answered at its `answer_at`), or None
    refusal: Callable[[str, str, Any], RequestError | None]


# The uvicorn versions this subclass was written and tested against (pyproject.toml pins the same range).
UVICORN_TESTED = ((0, 55), (0, 56))  # >= the first, < the second (major, minor)


def check_uvicorn(version: str | None = None) -> None:
    """RuntimeError naming the installed and the tested versions when uvicorn is outside UVICORN_TESTED: this
    module calls uvicorn's private protocol methods, which any release may change."""
    import uvicorn

    version = version or uvicorn.__version__
    major_minor = tuple(int(x) for x in version.split(".")[:2])
    low, high = UVICORN_TESTED
    if not low <= major_minor < high:
        raise RuntimeError(f"uvicorn {version} is installed, but tuneserve's HTTP protocol was tested with uvicorn "
                           f">={low[0]}.{low[1]},<{high[0]}.{high[1]}: install that "
                           f"(pip install 'uvicorn>={low[0]}.{low[1]},<{high[0]}.{high[1]}')")


def use_in_uvicorn() -> None:
    """Make uvicorn's "auto" HTTP protocol (what BentoML's workers ask for) this one, after checking uvicorn is a
    tested version. Called when the service module is imported in a worker, before uvicorn reads its
    configuration (BentoML makes uvicorn's Config itself, naming no protocol)."""
    from uvicorn import config

    check_uvicorn()
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:LimitedHttpToolsProtocol"


def error_response(status: int, message: str | bytes, close: bool = True, headers: dict[str, str] | None = None,
                   raw: bool = False) -> bytes:
    """A whole HTTP/1.1 answer with `{"error": message}` (or `message` itself, already JSON, when raw)."""
    body = message if raw else json.dumps({"error": message}).encode()
    head = [STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n"]
    head += [f"{k}: {v}\r\n".encode() for k, v in (headers or {}).items()]
    if close:
        head.append(b"connection: close\r\n")
    return b"".join([*head, b"\r\n", body])


class _Answered:
    """Stands in for uvicorn's RequestResponseCycle of a request answered from its headers: its body is
    dropped as it arrives (uvicorn's parser callbacks append to `body` until the response is complete)."""

    def __init__(self, complete: bool, keep_alive: bool) -> None:
        self.response_complete = complete
        self.keep_alive = keep_alive
        self.disconnected = False
        self.more_body = True

    @property
    def body(self) -> bytes:
        return b""

    @body.setter
    def body(self, _: bytes) -> None:
        pass

    class message_event:  # noqa: N801 - uvicorn calls cycle.message_event.set() when the connection ends
        @staticmethod
        def set() -> None:
            pass


class _LingeringTransport:
    """The connection's transport as a request's cycle sees it: its close() waits for the rest of the request
    body (the protocol's `_linger`), except after a 408 (the body did not arrive in time: lingering would give
    the same slow client more time); everything else is the transport's own."""

    def __init__(self, transport, linger: Callable[[], None]) -> None:
        self._transport, self._linger, self._closing, self._timed_out = transport, linger, False, False

    def write(self, data: bytes) -> None:
        if data.startswith(b"HTTP/1.1 408 "):  # uvicorn writes the status line and headers in one call
            self._timed_out = True
        self._transport.write(data)

    def close(self) -> None:
        self._closing = True
        if self._timed_out:
            self._transport.close()
        else:
            self._linger()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Rejected(Exception):
    """Raised in a parser callback to stop parsing; the answer is in the protocol's `_rejection`."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One connection. uvicorn makes it with (config, server_state, app_state); `app_state` is the ASGI lifespan
    state, where the service put its HeaderChecks at start-up (looked up per request: connections made before
    start-up finished see them once it has)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
        self._in_headers = False
        self._header_bytes = 0
        self._header_count = 0
        self._header_timer: TimerHandle | None = None
        self._rejection: tuple[int, str] | None = None
        self._linger_timer: TimerHandle | None = None
        self._linger_until = 0.0  # loop time; nonzero while the rest of a body is being read to be dropped
        self._held: TimerHandle | None = None  # a refused request's answer, waiting for its time

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._stop_lingering()
        if self._held is not None:
            self._held.cancel()
            self._held = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger_until:
            self._arm_linger_timer()
        self._unset_keepalive_if_required()
        continuing = self._in_headers
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as e:
            status, message = self._rejection or (400, f"malformed HTTP request ({e}); send HTTP/1.1 with a valid "
                                                       "request line, headers and Content-Length or chunked body")
            self._reject(status, message)
            return
        if continuing and self._in_headers:  # the whole chunk was header bytes, and they are still not done
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._reject(431, f"request headers are over {MAX_HEADER_BYTES} bytes")

    def send_400_response(self, msg: str) -> None:
        self._reject(400, msg)

    def _reject(self, status: int, message: str) -> None:
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self.transport.write(error_response(status, message))
            self.transport.close()

    # -- parser callbacks --------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes, self._header_count = True, 0, 0
        self._arm_header_timer()

    # The request line and headers are counted as the parser hands them over; a chunk that is all header
    # bytes and leaves them unfinished is counted whole (data_received), so an endless header is cut off
    # after MAX_HEADER_BYTES and one chunk, instead of being buffered.

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._rejection = (414, f"the request line is over {MAX_HEADER_BYTES} bytes")
            raise _Rejected()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > MAX_HEADERS:
            self._rejection = (431, f"more than {MAX_HEADERS} request headers")
            raise _Rejected()
        if self._header_bytes > MAX_HEADER_BYTES:
            self._rejection = (431, f"request headers are over {MAX_HEADER_BYTES} bytes")
            raise _Rejected()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm_header_timer()
        checks: HeaderChecks | None = self.app_state.get(STATE_KEY)
        answer = self._answer_from_headers(checks) if checks is not None else None
        if answer is None:
            super().on_headers_complete()
            self.cycle.transport = _LingeringTransport(self.transport, self._linger)
            return
        status, body, hold_s = answer
        if self.cycle is None or self.cycle.response_complete:
            # Nothing before it on this connection: answered straight onto the socket, with no ASGI task, now or
            # after the hold; the stand-in cycle drops the body as it arrives.
            cycle = _Answered(complete=False, keep_alive=self.parser.should_keep_alive())
            self.cycle = cycle  # type: ignore[assignment]
            if hold_s > 0:
                self._held = self.loop.call_later(hold_s, self._send_answer, cycle, status, body)
            else:
                self._send_answer(cycle, status, body)
        else:  # a pipelined request: its answer must wait its turn, as an ASGI app does
            app, self.app = self.app, _respond(status, body, hold_s)  # this request only: put back below
            try:
                super().on_headers_complete()
                self.cycle.transport = _LingeringTransport(self.transport, self._linger)
            finally:
                self.app = app

    def _answer_from_headers(self, checks: HeaderChecks) -> tuple[int, bytes, float] | None:
        """(status, JSON body, seconds to hold it) for a request answered from its request line and headers."""
        method = self.parser.get_method().decode("ascii", "replace")
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        if not checks.known_path(path):
            message = f"no route serves {method} {path}; GET /docs.json lists the routes"
            return 404, json.dumps({"error": message}).encode(), 0.0
        refused = checks.refusal(method, path, self.headers)
        if refused is None:
            return None
        hold_s = 0.0 if refused.answer_at is None else max(0.0, refused.answer_at - time.monotonic())
        return 503, json.dumps({"error": refused.message}).encode(), hold_s

    def _send_answer(self, cycle: _Answered, status: int, body: bytes) -> None:
        """Write a from-headers answer for `cycle`, then go on as after any answer: keep-alive or pipelined
        requests, or (the client asked to close) a lingering close."""
        self._held = None
        if self.transport.is_closing() or cycle.disconnected:
            return
        headers = {"retry-after": "1"} if status == 503 else None
        self.transport.write(error_response(status, body, close=not cycle.keep_alive, headers=headers, raw=True))
        cycle.response_complete = True
        if not cycle.keep_alive:
            self._linger()
            return
        self.on_response_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._linger_until:  # the refused body has all arrived: nothing unread is left to cause a reset
            self._close_now()

    def on_response_complete(self) -> None:
        if self._linger_until:  # closing: no keep-alive timer, no pipelined request; keep reading to drop
            self.server_state.total_requests += 1
            self.flow.resume_reading()
            return
        super().on_response_complete()

    # -- the lingering close -----------------------------------------------------------------------------------

    def _linger(self) -> None:
        """Close once the current request's body has all arrived (at once if it has)."""
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            self.transport.close()
            return
        self._linger_until = self.loop.time() + LINGER_TOTAL_S
        self._arm_linger_timer()

    def _arm_linger_timer(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        wait = min(LINGER_IDLE_S, self._linger_until - self.loop.time())
        self._linger_timer = self.loop.call_later(max(wait, 0.0), self._close_now)

    def _stop_lingering(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._linger_until = 0.0

    def _close_now(self) -> None:
        self._stop_lingering()
        if not self.transport.is_closing():
            self.transport.close()

    # -- the header timer --------------------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        checks: HeaderChecks | None = self.app_state.get(STATE_KEY)
        self._header_timeout_s = checks.header_timeout_s if checks is not None else DEFAULT_HEADER_TIMEOUT_S
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is None or self._in_headers:  # nothing, or only part of a request, arrived in time
            self._reject(408, f"the request headers did not arrive within {self._header_timeout_s:g} s")


def _respond(status: int, body: bytes, hold_s: float):
    """A minimal ASGI app answering `status` with `body` after `hold_s`, without reading the request body
    (uvicorn drops it)."""

    async def app(scope, receive, send) -> None:
        if hold_s > 0:
            await asyncio.sleep(hold_s)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + ([(b"retry-after", b"1")] if status == 503 else [])})
        await send({"type": "http.response.body", "body": body})

    return app


# -- the ASGI middleware and the API keys ----------------------------------------------------------------------


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def matches(token: str | None, key: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


@dataclass(frozen=True)
class Keys:
    api: str | None  # None: inference and model routes are open
    admin: str | None  # None: there is no management API
    metrics_auth: bool = False  # /metrics needs the API key too

    def required(self, access: str) -> tuple[str, str] | None:
        """(key, its variable) that a route of `access` needs, or None."""
        if access == ADMIN:
            return (self.admin, "TUNESERVE_ADMIN_KEY") if self.admin else None
        if access == API or (access == METRICS and self.metrics_auth):
            return (self.api, "TUNESERVE_API_KEY") if self.api else None
        return None

    def problem(self, access: str, headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str] | None:
        """(what is wrong, the variable naming the key) when `headers` do not carry the key `access` needs."""
        need = self.required(access)
        if need is None:
            return None
        key, which = need
        token = bearer(headers)
        if matches(token, key):
            return None
        return ("no 'Authorization: Bearer <key>' header" if token is None else "the key is wrong"), which


def header_checks(config: ServiceConfig, table: RouteTable, keys: Keys, admission: Admission,
                  on_refused: Callable[[str], None] = lambda path: None) -> HeaderChecks:
    """What the HTTP protocol asks of a request's line and headers: is the path served at all, and would
    admission refuse it (only classify routes, and only with the key they need: else the 401 comes first)."""

    def refusal(method: str, path: str, headers) -> RequestError | None:
        if not table.is_classify(method, path) or keys.problem(API, headers) is not None:
            return None
        refused = admission.refusal(1)
        if refused is not None:
            on_refused(path)
        return refused

    return HeaderChecks(header_timeout_s=config.header_timeout_s, known_path=table.is_known, refusal=refusal)


# Liveness and readiness, under our names and the Open Inference Protocol's.
PROBES = {"/livez": "live", "/readyz": "ready", "/v2/health/live": "live", "/v2/health/ready": "ready"}


class Front:
    def __init__(self, app, table: RouteTable, keys: Keys, health: Callable[[], dict[str, Any]],
                 model: Callable[[], str], checks: HeaderChecks | None = None):
        self.app, self.table, self.keys, self.health, self.model, self.checks = app, table, keys, health, model, checks

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            if self.checks is not None and "state" in scope:
                scope["state"][STATE_KEY] = self.checks
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in CLIENT_ROUTES:
            path = CLIENT_ROUTES[path]
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if scope["method"] == "GET" and path in PROBES:
            await self._probe(PROBES[path])(scope, receive, send)
            return
        problem = None
        if self.keys.api is not None or self.keys.admin is not None:  # else nothing needs a key: no lookup
            problem = self.keys.problem(self.table.access(path), scope.get("headers", []))
        if problem is not None:
            what, which = problem
            response = JSONResponse({"error": f"{what}: {path} needs the server's {which}"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer realm="tuneserve"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, _json_errors(scope, send))

    def _probe(self, which: str) -> JSONResponse:
        report = self.health()
        if which == "ready":
            return JSONResponse({"status": "ready", "model": self.model(), **report})
        if report["live"]:
            return JSONResponse({"status": "live", **report})
        w = report["workers"]
        return JSONResponse({"error": f"{w['expected'] - w['alive']} worker process(es) have been missing for "
                                      f"{w['missing_for_s']} s and were not restarted", **report}, status_code=503)


def _json_errors(scope, send):
    """`send`, with an error answer that is not JSON rewritten as `{"error": "<its text>: METHOD path"}`."""
    held: dict[str, Any] = {}

    async def send_json_errors(message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                held["start"], held["body"] = message, b""
                return
        elif "start" in held and message["type"] == "http.response.body":
            held["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            start = held.pop("start")
            text = held["body"].decode("utf-8", "replace").strip() or f"HTTP {start['status']}"
            body = json.dumps({"error": f"{text}: {scope['method']} {scope['path']}"}).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k not in (b"content-type", b"content-length")]
            await send({**start, "headers": [*headers, (b"content-type", b"application/json"),
                                             (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return send_json_errors

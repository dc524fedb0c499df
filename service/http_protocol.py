"""uvicorn's httptools protocol with the limits a public endpoint needs, and a refusal that costs microseconds.

BentoML runs each worker on uvicorn, which with httptools sets no limit on the size or number of request
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
- 503 for a classify request that admission would refuse anyway (service/admission.py), decided from the
  request line and headers alone: the request never reaches BentoML's middleware stack, and its body is
  read and dropped, so the connection stays usable. Under a flood this is most requests, and their cost
  decides how much CPU is left to answer the others (docs/benchmarks.md, "Open loop and admission").
Every answer here is `{"error": "..."}` like the service's own.
"""
from __future__ import annotations

import json
from asyncio import TimerHandle
from typing import Any, Callable

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# nginx's default large_client_header_buffers (4 x 8 KiB) and Apache's LimitRequestFields: far above what
# any client of this API sends (a few hundred bytes), far below what would cost memory.
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100
# nginx's lingering_time and lingering_timeout: a client still sending a refused body gets this long to finish
# (a 20 MB image at 10 Mbit/s takes 16 s) before the connection is cut anyway.
LINGER_TOTAL_S = 30.0
LINGER_IDLE_S = 5.0
# ASGI scope extension set on requests that admission let through from their headers.
ADMITTED_FROM_HEADERS = "tuneserve.admitted"


def admitted_from_headers(scope) -> bool:
    """Whether admission already judged this request (one image) from its request line and headers."""
    return bool(scope.get("extensions", {}).get(ADMITTED_FROM_HEADERS))


# ASGI scope extension set by a route that gave up waiting for the body (408): that connection closes at once,
# without the lingering close, which would give the same slow client more time.
CLOSE_AT_ONCE = "tuneserve.close_at_once"


def close_at_once(scope) -> None:
    scope.setdefault("extensions", {})[CLOSE_AT_ONCE] = True


# (method, path, headers) -> the JSON body of a 503 when the request would be refused, else None. Set by the
# service once its models are loaded; None until then.
Refuser = Callable[[str, str, "list[tuple[bytes, bytes]]"], "bytes | None"]
_refuser: Refuser | None = None
_header_timeout_s = 10.0
# path -> whether any route serves it. A path none serves is passed on as UNMATCHED_PATH (its own kept in
# the scope's extensions for the 404's message), so that metrics labelled by path, BentoML's among them,
# count every stray path under one label instead of making a series each.
_known_path: Callable[[str], bool] | None = None
UNMATCHED_PATH = "/{unmatched}"
ORIGINAL_PATH = "tuneserve.path"


def configure(refuser: Refuser | None, header_timeout_s: float, known_path: Callable[[str], bool] | None = None) -> None:
    global _refuser, _header_timeout_s, _known_path
    _refuser, _header_timeout_s, _known_path = refuser, header_timeout_s, known_path


def use_in_uvicorn() -> None:
    """Make uvicorn's "auto" HTTP protocol (what BentoML's workers ask for) this one. Called when the service
    module is imported in a worker, before uvicorn reads its configuration."""
    from uvicorn import config

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
    """Stands in for uvicorn's RequestResponseCycle of a request answered from its headers."""

    response_complete = True
    disconnected = False

    class message_event:  # noqa: N801 - uvicorn calls cycle.message_event.set() when the connection ends
        @staticmethod
        def set() -> None:
            pass


class _LingeringTransport:
    """The connection's transport as a request's cycle sees it: its close() waits for the rest of the request
    body (the protocol's `_linger`); everything else is the transport's own."""

    def __init__(self, transport, linger: Callable[[], None]) -> None:
        self._transport, self._linger, self._closing = transport, linger, False

    def close(self) -> None:
        self._closing = True
        self._linger()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Rejected(Exception):
    """Raised in a parser callback to stop parsing; the answer is in the protocol's `_rejection`."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = False
        self._header_bytes = 0
        self._header_count = 0
        self._header_timer: TimerHandle | None = None
        self._rejection: tuple[int, str] | None = None
        self._linger_timer: TimerHandle | None = None
        self._linger_until = 0.0  # loop time; nonzero while the rest of a body is being read to be dropped

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._stop_lingering()
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
        refusal = self._refusal()
        if refusal is None:
            if _refuser is not None:  # admission has looked at it: the route need not estimate again
                self.scope.setdefault("extensions", {})[ADMITTED_FROM_HEADERS] = True  # type: ignore[typeddict-item]
            super().on_headers_complete()
            self.cycle.transport = _LingeringTransport(self.transport, self._linger)
            path = self.scope.get("path", "")
            if _known_path is not None and not _known_path(path):
                self.scope.setdefault("extensions", {})[ORIGINAL_PATH] = path  # type: ignore[typeddict-item]
                self.scope["path"] = self.scope["raw_path"] = UNMATCHED_PATH  # type: ignore[typeddict-item]
                if isinstance(self.scope["raw_path"], str):
                    self.scope["raw_path"] = UNMATCHED_PATH.encode()  # type: ignore[typeddict-item]
        elif self.cycle is None or self.cycle.response_complete:
            # Nothing before it on this connection: answer straight onto the socket, with no ASGI task. The
            # stand-in cycle is already complete, so uvicorn's parser callbacks drop the body as it arrives.
            self.transport.write(error_response(503, refusal, close=False, headers={"retry-after": "1"}, raw=True))
            self.cycle = _Answered()
            self.server_state.total_requests += 1
        else:  # a pipelined request: its answer must wait its turn, as an ASGI app does
            app, self.app = self.app, _respond(refusal)  # this request only: BentoML's app is put back below
            try:
                super().on_headers_complete()
                self.cycle.transport = _LingeringTransport(self.transport, self._linger)
            finally:
                self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._linger_until:  # the refused body has all arrived: nothing unread is left to cause a reset
            self._close_now()
        elif isinstance(self.cycle, _Answered):
            self._arm_header_timer()  # as uvicorn's keep-alive timer would after an ordinary answer

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
        if (cycle is None or not cycle.more_body or self.transport.is_closing()
                or cycle.scope.get("extensions", {}).get(CLOSE_AT_ONCE)):
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

    def _refusal(self) -> bytes | None:
        if _refuser is None:
            return None
        method = self.parser.get_method().decode("ascii", "replace")
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        return _refuser(method, path, self.headers)

    # -- the header timer --------------------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(_header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is None or self._in_headers:  # nothing, or only part of a request, arrived in time
            self._reject(408, f"the request headers did not arrive within {_header_timeout_s:g} s")


def _respond(body: bytes):
    """A minimal ASGI app answering 503 with `body`, without reading the request body (uvicorn drops it)."""

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    return app

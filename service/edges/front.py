"""What every HTTP request meets before a route: the one ASGI middleware in front of BentoML's app, the API
keys, and the checks the HTTP protocol makes from a request's headers.

The middleware, in order: BentoML clients' API routes are answered by ours (route_table.CLIENT_ROUTES); the
probes are answered for every worker (health.py), before BentoML's own, which say nothing about the other
workers; a route that needs a key and lacks it gets its 401; and an error answer that is not JSON (a
framework's plain-text 404 or 500) becomes `{"error": "<its text>"}` with the same status. At start-up (the
ASGI lifespan) it hands the HTTP protocol its HeaderChecks through the lifespan state, the one channel uvicorn
gives a protocol (http_protocol.py).

API keys: `Authorization: Bearer <key>` on every route that classifies or tells about models
(TUNESERVE_API_KEY or _FILE), and a key of its own for the management API (TUNESERVE_ADMIN_KEY), whose routes
do not exist without it. The probes, the OpenAPI document and the Swagger UI stay open, and /metrics too unless
TUNESERVE_METRICS_AUTH: which route needs which key is the route table's `access`. A missing or wrong key is a
401 `{"error": ...}` with `WWW-Authenticate: Bearer`. Keys are compared in constant time (hmac.compare_digest)
and never logged: the errors name only the header that was missing or wrong.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from starlette.responses import JSONResponse

from tuneserve.service.config import ServiceConfig
from tuneserve.service.edges.http_protocol import STATE_KEY, HeaderChecks
from tuneserve.service.edges.route_table import ADMIN, API, CLIENT_ROUTES, METRICS, RouteTable
from tuneserve.service.engine.admission import Admission
from tuneserve.service.engine.errors import RequestError

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

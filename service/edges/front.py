"""The one ASGI middleware in front of BentoML's app: what every HTTP request meets before a route.

In order: BentoML clients' API routes are answered by ours (route_table.CLIENT_ROUTES); the probes are answered
for every worker (health.py), before BentoML's own, which say nothing about the other workers; a route that
needs a key and lacks it gets its 401 (auth.py, with the table's `access`); and an error answer that is not
JSON (a framework's plain-text 404 or 500) becomes `{"error": "<its text>"}` with the same status. At start-up
(the ASGI lifespan) it hands the HTTP protocol its HeaderChecks through the lifespan state, the one channel
uvicorn gives a protocol (http_protocol.py).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from starlette.responses import JSONResponse

from tuneserve.service.edges.auth import Keys
from tuneserve.service.edges.http_protocol import STATE_KEY, HeaderChecks
from tuneserve.service.edges.route_table import CLIENT_ROUTES, RouteTable

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

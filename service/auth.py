"""API keys: `Authorization: Bearer <key>` on every route that classifies or tells about models, and a key of
its own for the management API.

TUNESERVE_API_KEY (or _FILE) guards inference and model routes; TUNESERVE_ADMIN_KEY guards /v2/repository/...,
whose routes do not exist without it. /livez, /readyz, the OpenAPI document and the Swagger UI stay open,
and /metrics too unless TUNESERVE_METRICS_AUTH. A missing or wrong key is a 401 `{"error": ...}` with
`WWW-Authenticate: Bearer`. Keys are compared in constant time (hmac.compare_digest) and never logged:
the log and the errors name only the header that was missing or wrong.
"""
from __future__ import annotations

import hmac
from typing import Iterable

from starlette.responses import JSONResponse

ADMIN_PREFIX = "/v2/repository/"
OPEN_PATHS = frozenset({"/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs.json", "/", "/schema.json"})
OPEN_PREFIXES = ("/static_content/", "/assets/")  # the Swagger UI's files


def bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def matches(token: str | None, key: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


class ApiKeys:
    """ASGI middleware enforcing the keys (each None: that part is open)."""

    def __init__(self, app, api_key: str | None, admin_key: str | None, metrics_auth: bool = False):
        self.app, self.api_key, self.admin_key, self.metrics_auth = app, api_key, admin_key, metrics_auth

    def required(self, path: str) -> tuple[str, str] | None:
        """(key, which) a request to `path` must carry, or None."""
        if path.startswith(ADMIN_PREFIX):
            return (self.admin_key, "TUNESERVE_ADMIN_KEY") if self.admin_key else None
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (path == "/metrics" and not self.metrics_auth):
            return None
        return (self.api_key, "TUNESERVE_API_KEY") if self.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        need = self.required(scope["path"]) if scope["type"] == "http" else None
        if need is None:
            await self.app(scope, receive, send)
            return
        key, which = need
        token = bearer(scope.get("headers", []))
        if matches(token, key):
            await self.app(scope, receive, send)
            return
        problem = "no 'Authorization: Bearer <key>' header" if token is None else "the key is wrong"
        response = JSONResponse({"error": f"{problem}: {scope['path']} needs the server's {which}"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="tuneserve"'})
        await response(scope, receive, send)

"""API keys: `Authorization: Bearer <key>` on every route that classifies or tells about models, and a key of
its own for the management API.

TUNESERVE_API_KEY (or _FILE) guards inference and model routes; TUNESERVE_ADMIN_KEY guards /v2/repository/...,
whose routes do not exist without it. The probes, the OpenAPI document and the Swagger UI stay open, and
/metrics too unless TUNESERVE_METRICS_AUTH: which route needs which key is the route table's `access`
(route_table.py). A missing or wrong key is a 401 `{"error": ...}` with `WWW-Authenticate: Bearer` (front.py).
Keys are compared in constant time (hmac.compare_digest) and never logged: the log and the errors name only
the header that was missing or wrong.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Iterable

from tuneserve.service.edges.route_table import ADMIN, API, METRICS


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

"""The HTTP client that `tuneserve predict` and `tuneserve demo` use to talk to a running service."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:3000"


class ServiceUnreachable(RuntimeError):
    """No service answered at the URL (refused, timed out, bad address)."""


@dataclass
class Answer:
    status: int  # HTTP status
    body: dict[str, Any]  # the JSON answer; for a failure, at least {"error": "..."}

    @property
    def ok(self) -> bool:
        return self.status == 200


def service_url(url: str | None) -> str:
    return (url or os.environ.get("TUNESERVE_URL") or DEFAULT_URL).rstrip("/")


class ServiceClient:
    """`api_key` (default $TUNESERVE_API_KEY) for the inference routes, `admin_key` (default
    $TUNESERVE_ADMIN_KEY) for the management API."""

    def __init__(self, url: str | None = None, timeout_s: float = 120.0, api_key: str | None = None,
                 admin_key: str | None = None):
        self.url = service_url(url)
        self.api_key = api_key or os.environ.get("TUNESERVE_API_KEY") or None
        self.admin_key = admin_key or os.environ.get("TUNESERVE_ADMIN_KEY") or None
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def classify(self, image: bytes, top_k: int, model: str | None = None) -> Answer:
        path = f"/models/{model}/classify" if model else "/classify"
        return self._request("POST", path, params={"top_k": top_k}, content=image,
                             headers={"content-type": "application/octet-stream", **self._auth(self.api_key)})

    def explain(self, image: bytes, top_k: int, model: str | None = None) -> Answer:
        """The top-k with, per class, its heatmap and a PNG overlay: {"model", "predictions": [{"label",
        "score", "heatmap": [[...]], "overlay_png": base64}]}."""
        path = f"/models/{model}/explain" if model else "/explain"
        return self._request("POST", path, params={"top_k": top_k}, content=image,
                             headers={"content-type": "application/octet-stream", **self._auth(self.api_key)})

    def model(self) -> Answer:
        return self._request("GET", "/model", headers=self._auth(self.api_key))

    def manage(self, action: str, name: str, version: str | None = None) -> Answer:
        """The management API: `action` is load, unload or rollback."""
        body = {"version": version} if version else {}
        return self._request("POST", f"/v2/repository/models/{name}/{action}", json=body,
                             headers=self._auth(self.admin_key))

    @staticmethod
    def _auth(key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _request(self, method: str, path: str, **kwargs: Any) -> Answer:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServiceUnreachable(
                f"cannot reach the tuneserve service at {self.url} ({type(e).__name__}: {e}); start one with "
                "`tuneserve serve` or pass --url") from None
        return Answer(r.status_code, _json_body(r))


def _json_body(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {"error": r.text[:200] or r.reason_phrase}
    return body if isinstance(body, dict) else {"error": str(body)[:200]}

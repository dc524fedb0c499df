"""API keys on a real server: 401 with WWW-Authenticate for a missing or wrong key, 200 with the right one, the
probes open, /metrics closable, and neither key in the server's log."""
from __future__ import annotations

import os
import urllib.error
import urllib.request

import httpx
import pytest

from tuneserve.service.process import running_server
from support import photo

pytestmark = pytest.mark.slow

API = "api-9f2c1b7e-not-a-real-key"
ADMIN = "admin-47d1e0aa-not-a-real-key"


def test_keys_on_a_real_server(model, tmp_path):
    log = tmp_path / "server.log"
    env = {"TUNESERVE_MODELS": model.tag, "TUNESERVE_API_KEY_FILE": str(tmp_path / "api.key"),
           "TUNESERVE_ADMIN_KEY": ADMIN, "TUNESERVE_MODEL_CONTROL": "explicit", "TUNESERVE_METRICS_AUTH": "true",
           "TUNESERVE_WORKERS": "1"}
    (tmp_path / "api.key").write_text(API + "\n")  # a mounted secret, with its trailing newline
    with running_server(env=env, log_path=log) as url, httpx.Client(base_url=url, timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN}"}):
            r = client.post("/classify", content=photo("coffee.png"), headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="tuneserve"', r.text
            assert r.headers["content-type"] == "application/json" and "TUNESERVE_API_KEY" in r.json()["error"]
        # urllib sends `Connection: close`: the 401 must reach it whole while it is still sending a large body.
        for _ in range(5):
            req = urllib.request.Request(f"{url}/classify", data=os.urandom(4_000_000), method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=30)
            assert refused.value.code == 401
        ok = {"Authorization": f"Bearer {API}"}
        assert client.post("/classify", content=photo("coffee.png"), headers=ok).status_code == 200
        assert client.get("/models", headers=ok).json()["models"][0]["version"] == model.version
        assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 401 and client.get("/metrics", headers=ok).status_code == 200
        assert client.post("/v2/repository/index", headers=ok).status_code == 401
        index = client.post("/v2/repository/index", headers={"Authorization": f"Bearer {ADMIN}"})
        assert index.status_code == 200 and index.json()[0]["state"] == "READY"
        spec = client.get("/docs.json").json()  # open, and says which key each route needs
        assert spec["components"]["securitySchemes"]["apiKey"] == {
            "type": "http", "scheme": "bearer", "description": "TUNESERVE_API_KEY"}
        assert spec["paths"]["/classify"]["post"]["security"] == [{"apiKey": []}]
        assert spec["paths"]["/v2/repository/index"]["post"]["security"] == [{"adminKey": []}]
    text = log.read_text()
    assert API not in text and ADMIN not in text

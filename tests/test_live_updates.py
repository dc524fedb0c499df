"""Versions changing under load on a real server with 2 workers: 16 clients keep classifying while new versions
are registered (poll mode) or loaded and rolled back (explicit mode). No request fails, every answer names a
version that was being served when it was given, and after the stated bound every worker answers with the
new version: poll mode, the poll interval plus a load and warm-up (stated: 10 s for this 13 MB model on 2
busy cores); explicit mode, as soon as the management call has answered."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import pytest

from tuneserve.cli import main
from tuneserve.models.store import save_model
from tuneserve.service.process import running_server
from support import photo

pytestmark = pytest.mark.slow

CLIENTS = 16
POLL_BOUND_S = 10.0
ADMIN = "admin-key-for-live-tests"


def register_copy(model, name: str) -> str:
    """The built-in model's graph registered again under `name`: a new version; returns the version."""
    return save_model(name, dataclasses.replace(model.card, files={}), model.onnx_path).version


class Load:
    """CLIENTS clients classifying in a loop; every answer kept as (sent, received, status, version)."""

    def __init__(self, url: str, path: str):
        self.url, self.path, self.answers, self.stop = url, path, [], False
        self.image = photo("coffee.png")

    async def client(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as c:
            while not self.stop:
                sent = time.monotonic()
                r = await c.post(self.path, content=self.image)
                version = r.json()["model"].split(":")[1] if r.status_code == 200 else None
                self.answers.append((sent, time.monotonic(), r.status_code, version))

    def run(self) -> asyncio.Future:
        return asyncio.gather(*(self.client() for _ in range(CLIENTS)))


async def probe(url: str, path: str, n: int = 12) -> set[str]:
    """The versions `n` requests on fresh connections get (they land on either worker)."""
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        answers = await asyncio.gather(*(c.post(path, content=photo("coffee.png")) for _ in range(n)))
    return {r.json()["model"].split(":")[1] for r in answers}


def check_answers(answers, changes: list[tuple[float, str]]) -> None:
    """`changes`: (time from which the version may be served, version), in order."""
    assert answers and {a[2] for a in answers} == {200}, {a[2] for a in answers}
    for sent, received, _, version in answers:
        allowed = {v for t, v in changes if t <= received}
        assert version in allowed, (version, allowed)


def test_poll_mode_switches_every_worker_within_the_bound_without_a_failed_request(model):
    name = "live-poll"
    v0 = register_copy(model, name)
    env = {"TUNESERVE_MODELS": name, "TUNESERVE_MODEL_CONTROL": "poll", "TUNESERVE_POLL_INTERVAL_S": "1",
           "TUNESERVE_WORKERS": "2", "TUNESERVE_MAX_LATENCY_MS": "10000"}
    with running_server(env=env) as url:
        async def scenario() -> tuple[list, list]:
            load = Load(url, f"/models/{name}/classify")
            running = load.run()
            changes = [(0.0, v0)]
            await asyncio.sleep(2)
            for _ in range(3):
                registered = time.monotonic()
                version = await asyncio.to_thread(register_copy, model, name)
                changes.append((registered, version))
                deadline = registered + POLL_BOUND_S
                while await probe(url, f"/models/{name}/classify") != {version}:
                    assert time.monotonic() < deadline, f"not every worker serves {version} {POLL_BOUND_S} s after it was registered"
                    await asyncio.sleep(0.5)
                await asyncio.sleep(1)
            load.stop = True
            await running
            return load.answers, changes

        answers, changes = asyncio.run(scenario())
    check_answers(answers, changes)
    assert {a[3] for a in answers} == {v for _, v in changes}  # the load saw every version


def test_explicit_mode_load_and_rollback_reach_every_worker_when_the_call_returns(model, capsys, monkeypatch):
    monkeypatch.delenv("TUNESERVE_ADMIN_KEY", raising=False)
    name = "live-explicit"
    v0 = register_copy(model, name)
    v1 = register_copy(model, name)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    env = {"TUNESERVE_MODELS": f"{name}:{v0}", "TUNESERVE_MODEL_CONTROL": "explicit", "TUNESERVE_ADMIN_KEY": ADMIN,
           "TUNESERVE_WORKERS": "2", "TUNESERVE_MAX_LATENCY_MS": "10000"}
    with running_server(env=env) as url:
        async def scenario() -> tuple[list, list]:
            load = Load(url, f"/models/{name}/classify")
            running = load.run()
            changes = [(0.0, v0)]
            await asyncio.sleep(2)
            async with httpx.AsyncClient(base_url=url, timeout=180) as c:
                asked = time.monotonic()
                r = await c.post(f"/v2/repository/models/{name}/load", json={"version": v1}, headers=admin)
                assert r.status_code == 200 and r.json() == {"name": name, "version": v1, "workers": 2}, r.text
                changes.append((asked, v1))
                assert await probe(url, f"/models/{name}/classify") == {v1}  # every worker, at once
                await asyncio.sleep(1)
                asked = time.monotonic()
                r = await c.post(f"/v2/repository/models/{name}/rollback", headers=admin)
                assert r.status_code == 200 and r.json()["version"] == v0, r.text
                changes.append((asked, v0))
                assert await probe(url, f"/models/{name}/classify") == {v0}
            await asyncio.sleep(1)
            load.stop = True
            await running
            return load.answers, changes

        answers, changes = asyncio.run(scenario())
        # The same through the CLI: `tuneserve models load|rollback --url`.
        assert main(["models", "load", name, "--version", v1, "--url", url, "--admin-key", ADMIN]) == 0
        assert f"{name}: serving version {v1} on 2 worker(s)" in capsys.readouterr().out
        assert main(["models", "rollback", name, "--url", url]) == 1  # no admin key
        assert "needs the server's TUNESERVE_ADMIN_KEY (HTTP 401)" in capsys.readouterr().err
    check_answers(answers, changes)

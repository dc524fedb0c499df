"""What production throws at the service, in fast versions: damaged models, a device that fails in the
worker, images that are cheap to send and costly to decode. Each ends in a clear error and no half-served
state: the server exits non-zero with one line, or answers 4xx and keeps serving within its memory bound."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tuneserve.models.runtime import gpu_present
from tuneserve.models.store import save_model
from tuneserve.service.process import SERVICE, free_port, running_server
from support import forged_size_jpeg, photo, wide_grey_png

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def damaged(model):
    """A registered copy of the built-in model whose model.onnx was then damaged in place (same size)."""
    stored = save_model("damaged", dataclasses.replace(model.card, files={}), model.onnx_path)
    data = bytearray(stored.onnx_path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    stored.onnx_path.write_bytes(bytes(data))
    return stored


def _bentoml_serve(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(free_port()), "--host", "127.0.0.1"]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def test_a_damaged_model_is_one_error_before_anything_starts(damaged, capsys):
    from tuneserve.cli import main

    assert main(["serve", "--model", damaged.tag, "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve {damaged.tag}: model.onnx has changed since it was registered")
    assert len(err.strip().splitlines()) == 1
    # bentoml serve on its own: the check runs in its main process, before any worker exists.
    r = _bentoml_serve({"TUNESERVE_MODEL": damaged.tag})
    assert r.returncode == 1 and "model.onnx has changed since it was registered" in r.stderr
    assert "Traceback" not in r.stderr and "Service tuneserve initialized" not in r.stderr


def test_a_cut_short_model_file_is_not_served(damaged, model):
    (damaged.path / "model.onnx").write_bytes(model.onnx_path.read_bytes()[:1000])
    r = _bentoml_serve({"TUNESERVE_MODEL": damaged.tag})
    assert r.returncode == 1 and f"{damaged.tag} is incomplete (model.onnx is 1000 bytes" in r.stderr


@pytest.mark.skipif(gpu_present(), reason="on a GPU machine CUDA starts: nothing fails")
def test_cuda_asked_for_where_it_cannot_run_is_one_error_before_any_worker(model):
    """The plan's device comes from a CUDA session that ran the model (service/plan.py): TUNESERVE_DEVICE=cuda
    where none runs is one readable error from the main process, before any worker starts."""
    r = _bentoml_serve({"TUNESERVE_MODEL": model.tag, "TUNESERVE_DEVICE": "cuda"}, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.count("error: TUNESERVE_DEVICE=cuda, but") == 1 and "Traceback" not in r.stderr
    assert "Service tuneserve initialized" not in r.stderr


@pytest.mark.skipif(gpu_present(), reason="on a GPU machine CUDA starts: nothing fails")
def test_a_worker_that_cannot_start_stops_the_server_instead_of_restarting(model):
    """A failure only a worker meets (here: a plan handed over for CUDA, which the worker cannot start; on a
    real host, its device or its memory) stops the whole server with exit 1 and the reason, instead of the
    worker being restarted forever."""
    from tuneserve.service.config import ServiceConfig
    from tuneserve.service.plan import ServingPlan

    config = ServiceConfig(models=model.tag, device="cuda", grpc_port=0)  # 8001 may be another server's
    plan = dataclasses.replace(ServingPlan.resolve(dataclasses.replace(config, device="cpu")), config=config,
                               device="cuda", device_reason="handed over as if a CUDA session had run")
    started = time.monotonic()
    r = _bentoml_serve(plan.to_env(), timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.count("error: cannot serve") == 1 and "device 'cuda' was asked for" in r.stderr
    assert r.stderr.count("Service tuneserve initialized") == 0
    assert time.monotonic() - started < 60  # it stopped by itself: the timeout above is not what ended it


def _worker_rss(server_pid: int) -> int:
    procs = [psutil.Process(server_pid), *psutil.Process(server_pid).children(recursive=True)]
    return max(p.memory_info().rss for p in procs if p.is_running())  # the worker is the largest


def test_costly_images_are_bounded_and_normal_requests_keep_being_served(hymenoptera, model, tmp_path):
    """Four clients send a 90 KB PNG of 40 million 16-bit pixels (~230 MiB to decode) over and over, while
    others send ordinary photos; forged and over-budget images are refused from their header. Stated bound:
    the worker's resident memory stays within 700 MiB of its size at rest (one large decode at a time with 2
    decoding threads, ~230 MiB, plus the model's arenas), and it gives the memory back afterwards."""
    big = wide_grey_png()
    normal = sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[0].read_bytes()
    log = tmp_path / "server.log"
    env = {"TUNESERVE_MODEL": model.tag, "TUNESERVE_PREPROCESS_THREADS": "2", "TUNESERVE_MAX_LATENCY_MS": "10000"}
    with running_server(env=env, log_path=log) as url:
        server_pid = next(p.pid for p in psutil.process_iter(["cmdline"])
                          if url.rsplit(":", 1)[1] in " ".join(p.info["cmdline"] or []) and "bentoml" in " ".join(p.info["cmdline"] or []))
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(8):
                assert client.post("/classify", content=normal).status_code == 200
            at_rest = _worker_rss(server_pid)
            assert client.post("/classify", content=forged_size_jpeg(normal)).status_code == 400
            assert client.post("/classify", content=photo("coffee.png")).status_code == 200

        peak = at_rest
        order: list[str] = []

        async def load() -> tuple[list[int], list[int]]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                async def big_client() -> list[int]:
                    codes = []
                    for _ in range(3):
                        codes.append((await client.post("/classify", content=big)).status_code)
                    order.append("big")
                    return codes

                async def normal_client() -> list[int]:
                    codes = []
                    for _ in range(10):
                        codes.append((await client.post("/classify", content=normal)).status_code)
                    order.append("normal")
                    return codes

                async def watch() -> None:
                    nonlocal peak
                    while len(order) < 6:
                        peak = max(peak, _worker_rss(server_pid))
                        await asyncio.sleep(0.05)

                results = await asyncio.gather(*(big_client() for _ in range(4)), *(normal_client() for _ in range(2)),
                                               watch())
                return [c for r in results[:4] for c in r], [c for r in results[4:6] for c in r]

        big_codes, normal_codes = asyncio.run(load())
        assert big_codes == [200] * 12 and normal_codes == [200] * 20
        assert order[:2] == ["normal", "normal"]  # ordinary photos were not stuck behind the large decodes
        assert peak - at_rest < 700 * 2**20, (at_rest >> 20, peak >> 20)
        time.sleep(0.5)
        assert _worker_rss(server_pid) - at_rest < 150 * 2**20, (at_rest >> 20, _worker_rss(server_pid) >> 20)

"""End to end: fine-tune on real photos with the training code, then serve the model with `tuneserve serve`
(a real `bentoml serve` process on a free port) and check what comes back over HTTP: the same top-1 as
PyTorch on the same images, correct answers under concurrency with real batching, the CLI client, the
demo, 503 instead of a hang under overload, and batching switched off."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tuneserve.service.process import free_port, running_server
from support import inference_batches, builtin_model, photo
from tuneserve.cli import main

pytestmark = pytest.mark.slow

PER_CLASS_VAL = 6


@pytest.fixture(scope="module")
def finetuned(ants_bees):
    """A 1-epoch fine-tune on a small real subset, through the training code; (stored model, run folder)."""
    return ants_bees


@pytest.fixture(scope="module")
def server(finetuned):
    """`tuneserve serve --model TAG` as a child process; its URL."""
    model, _ = finetuned
    port = free_port()
    # Host and port from BentoML's own variables (no flags); a setting as a flag reaches every worker. A latency
    # bound of 10 s: these tests send bursts to see batching, not admission refusing part of them.
    command = [sys.executable, "-m", "tuneserve", "serve", "--model", model.tag, "--max-batch-images", "20",
               "--max-latency-ms", "10000"]
    with running_server(port=port, command=command, env={"BENTOML_HOST": "127.0.0.1", "BENTOML_PORT": str(port)}) as url:
        yield url


@pytest.fixture(scope="module")
def real_photos(hymenoptera) -> list[Path]:
    """Validation photos the model was not trained on (both classes), plus the dataset's one GIF."""
    val = [p for cls in ("ants", "bees") for p in sorted((hymenoptera / "val" / cls).glob("*.jpg"))[PER_CLASS_VAL:PER_CLASS_VAL + 8]]
    return val + sorted(hymenoptera.rglob("*.gif"))


def test_served_top1_equals_pytorch(server, finetuned, real_photos):
    import torch

    from tuneserve.models.preprocessing import preprocess
    from tuneserve.models.weights import build_model
    from tuneserve.training import checkpoint

    model, run_dir = finetuned
    ckpt = checkpoint.load(run_dir / "best.pt")
    net = build_model(ckpt["arch"], len(ckpt["classes"]), "none")
    net.load_state_dict(ckpt["model"])
    net.eval()
    batch = np.stack([preprocess(p, model.card.preprocessing) for p in real_photos])
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(batch)), dim=1).numpy()
    expected = [ckpt["classes"][i] for i in probs.argmax(1)]

    with httpx.Client(base_url=server, timeout=60) as client:
        answers = [client.post("/classify", content=p.read_bytes(), params={"top_k": 2}) for p in real_photos]
        info = client.get("/model").json()
    assert [a.status_code for a in answers] == [200] * len(real_photos)
    assert [a.json()["predictions"][0]["label"] for a in answers] == expected
    for a, p in zip(answers, probs):
        top = a.json()["predictions"][0]
        assert top["score"] == pytest.approx(float(p.max()), abs=1e-4)
    assert {a.json()["model"] for a in answers} == {model.tag}
    assert info["limits"]["max_batch_images"] == 20  # `serve --max-batch-images 20` reached the worker
    assert info["tag"] == model.tag and info["labels"] == ["ants", "bees"] and info["arch"] == ckpt["arch"]
    assert info["metrics"]["val_images"] == 2 * PER_CLASS_VAL and info["parity"]["top1_agreement"] == 1.0


def test_concurrent_requests_batch_on_the_real_server(server, real_photos):
    async def run() -> tuple[list[httpx.Response], dict[str, list], str, str]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            expected = {p: (await client.post("/classify", content=p.read_bytes())).json() for p in real_photos}
            before = (await client.get("/metrics")).text
            jobs = [real_photos[i % len(real_photos)] for i in range(64)]
            answers = await asyncio.gather(*(client.post("/classify", content=p.read_bytes()) for p in jobs))
            after = (await client.get("/metrics")).text
        return answers, [expected[p] for p in jobs], before, after

    answers, expected, before, after = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * len(answers), {a.text for a in answers if a.status_code != 200}
    for a, e in zip(answers, expected):
        assert [p["label"] for p in a.json()["predictions"]] == [p["label"] for p in e["predictions"]]
        assert a.json()["predictions"][0]["score"] == pytest.approx(e["predictions"][0]["score"], abs=1e-5)
    (b0, s0), (b1, s1) = inference_batches(before), inference_batches(after)
    assert (b1 - b0) - (s1 - s0) > 0, "no inference call carried more than one image"
    assert b1 - b0 < len(answers)


def test_classify_batch_on_the_real_server(server, real_photos):
    with httpx.Client(base_url=server, timeout=60) as client:
        files = [("images", (p.name, p.read_bytes())) for p in real_photos]
        r = client.post("/classify_batch", files=files, params={"top_k": 1})
        singles = [client.post("/classify", content=p.read_bytes(), params={"top_k": 1}).json() for p in real_photos]
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [p.name for p in real_photos]
    assert [x["predictions"][0]["label"] for x in results] == [s["predictions"][0]["label"] for s in singles]


def test_predict_cli(server, real_photos, capsys, tmp_path):
    assert main(["predict", *map(str, real_photos[:2]), "--url", server, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "IMAGE" in out and real_photos[0].name in out and ("ants" in out or "bees" in out)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    assert main(["predict", str(bad), "--url", server]) == 1  # the job failed for that image
    assert "not an image" in capsys.readouterr().err
    assert main(["predict", str(real_photos[0]), str(bad), "--url", server, "--json"]) == 1
    good, failed = json.loads(capsys.readouterr().out)
    assert good["image"] == str(real_photos[0]) and good["predictions"]
    assert failed == {"image": str(bad), "error": failed["error"], "status": 400} and "not an image" in failed["error"]
    assert main(["predict", str(tmp_path / "missing.jpg"), "--url", server]) == 2  # a usage error
    assert "no such image file" in capsys.readouterr().err
    assert main(["predict", str(real_photos[0]), "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach the tuneserve service" in capsys.readouterr().err


def test_demo_classifies_the_sample_photos_over_http(tmp_path):
    builtin_model()
    r = subprocess.run([sys.executable, "-m", "tuneserve", "demo", "--output-dir", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "served at http://127.0.0.1:" in r.stdout
    coffee_line = next(line for line in r.stdout.splitlines() if line.startswith("coffee.png"))
    assert "espresso" in coffee_line
    assert "server stopped" in r.stdout
    # and where the model looked, drawn over the first photo (POST /explain)
    overlay = tmp_path / "coffee.espresso.explain.png"
    assert f"where the model looked in coffee.png: {overlay}" in r.stdout and overlay.read_bytes()[:4] == b"\x89PNG"


def test_overload_is_a_fast_503_not_a_hang():
    """A burst far beyond what the worker can answer within a short latency bound: every answer is a 200 or
    a 503 with a JSON reason and Retry-After, the work that could not be done in time is shed, and the server
    then answers normally."""
    model = builtin_model()
    with running_server(env={"TUNESERVE_MODEL": model.tag, "TUNESERVE_MAX_LATENCY_MS": "150"}) as url:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=200)) as client:
                for _ in range(4):  # connections open, thread pools started
                    await client.post("/classify", content=photo("coffee.png"))
                return await asyncio.gather(*(client.post("/classify", content=photo("coffee.png")) for _ in range(160)))

        answers = asyncio.run(burst())
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
        for shed in (a for a in answers if a.status_code == 503):
            assert "TUNESERVE_MAX_LATENCY_MS=150" in shed.json()["error"] and shed.headers["retry-after"] == "1"
        assert httpx.post(f"{url}/classify", content=photo("coffee.png"), timeout=30).status_code == 200

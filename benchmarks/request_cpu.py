"""Server CPU time per request: what one request costs the service's processes, whatever the client does.

    python benchmarks/request_cpu.py                  # GET /model, POST /classify and the v2 infer route
    python benchmarks/request_cpu.py --env TUNESERVE_WORKERS=2 --requests 3000

Starts the service (`service.process.running_server`), sends a fixed number of requests at a fixed
concurrency, and reads the CPU time (user + system) of the `bentoml serve` process tree before and after.
GET /model measures the HTTP stack alone (uvicorn, BentoML's middleware, our ASGI app, a JSON answer);
POST /classify with a real photo adds decoding, preprocessing, batching and the model; the Open Inference
Protocol's infer route (the photo as a binary BYTES tensor, as tritonclient sends it) alternates with it
--rounds times, and their ratio is printed. On a GPU host the
model leaves the CPU, and what remains per request bounds the requests/s the CPUs can serve.
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from loadgen import v2_binary_body
from results_io import write_result
from shared_data import HYMENOPTERA

DEFAULT_PHOTO_DIR = HYMENOPTERA / "val" / "ants"


def tree_cpu_s(root: psutil.Process) -> float:
    """User + system CPU seconds of `root` and every process under it."""
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def fire(url: str, path: str, body: bytes | None, n: int, concurrency: int,
               headers: dict[str, str] | None = None, files: list | None = None) -> int:
    """n requests, at most `concurrency` at a time -> how many did not answer 200. A POST of `body` (or of the
    multipart `files`), a GET when there is neither."""
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=concurrency), timeout=120) as c:
        gate, failed = asyncio.Semaphore(concurrency), 0

        async def one() -> None:
            nonlocal failed
            async with gate:
                post = body is not None or files
                r = await (c.post(path, content=body, files=files, headers=headers) if post else c.get(path))
                failed += r.status_code != 200

        await asyncio.gather(*(one() for _ in range(n)))
        return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=None, help="JPEG for /classify (default: a hymenoptera ant)")
    ap.add_argument("--requests", type=int, default=1500, help="measured requests per endpoint (x2 for /model)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of /classify and the v2 route")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="service setting (repeatable)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--env takes NAME=VALUE, got {item!r}")
        env[name] = value
    photo = args.photo or next(iter(sorted(DEFAULT_PHOTO_DIR.glob("*.jpg"))), None)
    if photo is None or not Path(photo).is_file():
        ap.error(f"no photo: pass --photo FILE (looked in {DEFAULT_PHOTO_DIR})")

    from tuneserve.service.process import running_server

    rows: list[dict[str, Any]] = []
    me = psutil.Process()
    image = Path(photo).read_bytes()
    v2_body, v2_headers = v2_binary_body(image)
    with running_server(env=env) as url:
        (server,) = me.children()
        name = httpx.get(f"{url}/model", timeout=30).json()["name"]
        infer = f"/v2/models/{name}/infer"
        # /classify and the v2 route alternate (--rounds): this machine's speed drifts by several percent.
        plan = [("/model", None, None, 2 * args.requests)]
        for _ in range(args.rounds):
            plan += [("/classify", image, None, args.requests), (infer, v2_body, v2_headers, args.requests)]
        for path, body, headers, n in plan:
            asyncio.run(fire(url, path, body, min(200, n), args.concurrency, headers))  # warm-up: connections, arenas
            cpu0, t0 = tree_cpu_s(server), time.perf_counter()
            failed = asyncio.run(fire(url, path, body, n, args.concurrency, headers))
            cpu1, t1 = tree_cpu_s(server), time.perf_counter()
            label = "/v2/.../infer (binary)" if path == infer else path
            rows.append({"path": label, "requests": n, "failed": failed, "requests_per_s": round(n / (t1 - t0), 1),
                         "server_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / n, 3)})
            print(f"{label:24s} {n:6d} requests, {failed} failed, {n / (t1 - t0):8.1f} req/s, "
                  f"server CPU {1000 * (cpu1 - cpu0) / n:6.3f} ms/request", flush=True)
    per_path: dict[str, list[float]] = {}
    for r in rows:
        per_path.setdefault(r["path"], []).append(r["server_cpu_ms_per_request"])
    medians = {path: statistics.median(v) for path, v in per_path.items()}
    ratio = medians["/v2/.../infer (binary)"] / medians["/classify"]
    print(f"server CPU per image, v2 binary / /classify (medians of {args.rounds}): {ratio:.3f}")
    if args.out:
        write_result(args.out, env=env, concurrency=args.concurrency, photo=Path(photo).name, rows=rows,
                     median_cpu_ms=medians, v2_over_classify=round(ratio, 3))


if __name__ == "__main__":
    main()

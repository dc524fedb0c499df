"""Server CPU time per request: what one request costs the service's processes, whatever the client does.

    python benchmarks/request_cpu.py                                   # GET /model and POST /classify
    python benchmarks/request_cpu.py --env TUNESERVE_WORKERS=2 --requests 3000

Starts the service (`service.process.running_server`), sends a fixed number of requests at a fixed
concurrency, and reads the CPU time (user + system) of the `bentoml serve` process tree before and after.
GET /model measures the HTTP stack alone (uvicorn, BentoML's middleware, our ASGI app, a JSON answer);
POST /classify with a real photo adds decoding, preprocessing, batching and the model. On a GPU host the
model leaves the CPU, and what remains per request bounds the requests/s the CPUs can serve.
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
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


async def fire(url: str, path: str, body: bytes | None, n: int, concurrency: int) -> int:
    """n requests, at most `concurrency` at a time -> how many did not answer 200."""
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=concurrency), timeout=60) as c:
        gate, failed = asyncio.Semaphore(concurrency), 0

        async def one() -> None:
            nonlocal failed
            async with gate:
                r = await (c.post(path, content=body) if body is not None else c.get(path))
                failed += r.status_code != 200

        await asyncio.gather(*(one() for _ in range(n)))
        return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=None, help="JPEG for /classify (default: a hymenoptera ant)")
    ap.add_argument("--requests", type=int, default=1500, help="measured requests per endpoint (x2 for /model)")
    ap.add_argument("--concurrency", type=int, default=16)
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
    with running_server(env=env) as url:
        (server,) = me.children()
        for path, body, n in [("/model", None, 2 * args.requests), ("/classify", Path(photo).read_bytes(), args.requests)]:
            asyncio.run(fire(url, path, body, min(200, n), args.concurrency))  # warm-up: connections, arenas
            cpu0, t0 = tree_cpu_s(server), time.perf_counter()
            failed = asyncio.run(fire(url, path, body, n, args.concurrency))
            cpu1, t1 = tree_cpu_s(server), time.perf_counter()
            rows.append({"path": path, "requests": n, "failed": failed, "requests_per_s": round(n / (t1 - t0), 1),
                         "server_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / n, 3)})
            print(f"{path:10s} {n:6d} requests, {failed} failed, {n / (t1 - t0):8.1f} req/s, "
                  f"server CPU {1000 * (cpu1 - cpu0) / n:6.3f} ms/request", flush=True)
    if args.out:
        write_result(args.out, env=env, concurrency=args.concurrency, photo=Path(photo).name, rows=rows)


if __name__ == "__main__":
    main()

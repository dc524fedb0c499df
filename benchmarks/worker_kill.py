"""Availability through a worker's death: kill -9 one worker under load and count what the clients saw.

    python benchmarks/worker_kill.py --workers 1 2 --out benchmarks/results/worker-kill.json

For each worker count, against a fresh `bentoml serve`: 16 closed-loop clients send the hymenoptera val
photos to /classify for --seconds; at --kill-at seconds one worker gets SIGKILL (BentoML starts a new one).
Reported: images/s before the kill, requests that failed (connection reset or 5xx), the longest stretch
without a successful answer, and what /readyz said meanwhile.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import loadgen
from results_io import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--kill-at", type=float, default=6.0)
    loadgen.add_server_arguments(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bodies = loadgen.photo_bodies(args.images)
    rows = [run(workers, bodies, args) for workers in args.workers]
    print(f"{'workers':>7} {'img/s before':>12} {'failed':>6} {'of':>6} {'longest gap s':>13}  /readyz during")
    for r in rows:
        print(f"{r['workers']:>7} {r['images_per_s_before']:>12} {r['failed']:>6} {r['requests']:>6} "
              f"{r['longest_gap_s']:>13}  {r['readyz']}")
    if args.out:
        write_result(args.out, rows=rows)


def run(workers: int, bodies: list[bytes], args) -> dict:
    env = {**loadgen.server_env(args.env), "TUNESERVE_WORKERS": str(workers)}
    with loadgen.serve(args.server_dir, env) as (url, port):
        requests = loadgen.build_requests(url, "/classify", bodies)
        loadgen.run(loadgen.closed_loop(url, requests, 16, 3))
        probes: list[str] = []
        records = loadgen.run(_load_and_kill(url, port, requests, args, probes))
    ok = sorted(r.due + r.latency for r in records if r.status == 200)
    gaps = [b - a for a, b in zip(ok, ok[1:]) if a > args.kill_at - 1]
    before = [r for r in records if r.status == 200 and r.due < args.kill_at]
    return {"workers": workers, "requests": len(records), "failed": sum(r.status != 200 for r in records),
            "statuses": sorted({r.status for r in records}), "images_per_s_before": round(len(before) / args.kill_at, 1),
            "longest_gap_s": round(max(gaps, default=0.0), 2), "readyz": " ".join(dict.fromkeys(probes))}


async def _load_and_kill(url: str, port: int, requests: list[bytes], args, probes: list[str]) -> list[loadgen.Record]:
    load = asyncio.create_task(loadgen.closed_loop(url, requests, 16, args.seconds))
    await asyncio.sleep(args.kill_at)
    os.kill(loadgen.worker_processes(port)[0].pid, signal.SIGKILL)
    async with httpx.AsyncClient(base_url=url, timeout=2, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        end = time.monotonic() + args.seconds - args.kill_at - 1
        while time.monotonic() < end:
            try:
                r = await client.get("/readyz")
                w = r.json().get("workers", {})
                probes.append(f"{r.status_code}:{w.get('alive', '?')}/{w.get('expected', '?')}")
            except (httpx.HTTPError, ValueError):
                probes.append("no answer")
            await asyncio.sleep(0.5)
    return await load


if __name__ == "__main__":
    main()

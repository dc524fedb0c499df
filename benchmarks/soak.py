"""Steady load for minutes: errors, latency per minute, and each server process's memory and open files.

    python benchmarks/soak.py --minutes 10 --share 0.7 --out benchmarks/results/soak.json

Against a fresh `bentoml serve` (default settings; --env to change them): capacity C from 16 closed-loop
clients for 20 s, then an open loop at --share x C for --minutes, the hymenoptera val photos sent raw to
/classify (benchmarks/loadgen.py). Every 10 s the resident memory and open file descriptors of every process
of the server are sampled. Reported per minute: requests, errors, p50/p99; per process: RSS at the end of
the first minute and at the end, and the growth between them (the target: none beyond 5% for a worker).
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import loadgen
import psutil
from results_io import write_result

SAMPLE_S = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--share", type=float, default=0.7, help="offered load, x capacity")
    ap.add_argument("--rate", type=float, default=None, help="offered requests/s (skips measuring capacity)")
    loadgen.add_server_arguments(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    bodies = loadgen.photo_bodies(args.images)
    env = loadgen.server_env(args.env)
    with loadgen.serve(args.server_dir, env) as (url, port):
        requests = loadgen.build_requests(url, "/classify", bodies)
        capacity = None
        if args.rate is None:
            loadgen.run(loadgen.closed_loop(url, requests, 16, 5))
            capacity = sum(r.status == 200 for r in loadgen.run(loadgen.closed_loop(url, requests, 16, 20))) / 20
        rate = args.rate or args.share * capacity
        server = loadgen.server_process(port)
        samples: list[dict] = []
        records = loadgen.run(_soak(url, requests, rate, 60 * args.minutes, server, samples))

    minutes = []
    for m in range(int(args.minutes)):
        rs = [r for r in records if 60 * m <= r.due < 60 * (m + 1)]
        ok = [r.latency for r in rs if r.status == 200]
        minutes.append({"minute": m + 1, "requests": len(rs), "errors": len(rs) - len(ok),
                        "p50_ms": _ms(loadgen.percentile(ok, 50)), "p99_ms": _ms(loadgen.percentile(ok, 99))})
    processes = _growth(samples)
    result = {"env": env, "capacity_images_per_s": capacity, "rate_per_s": round(rate, 1), "minutes": args.minutes,
              "requests": len(records), "errors": sum(r.status != 200 for r in records),
              "statuses": sorted({r.status for r in records}), "per_minute": minutes, "processes": processes,
              "samples": samples}
    print(f"{'minute':>6} {'requests':>8} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7}")
    for m in minutes:
        print(f"{m['minute']:>6} {m['requests']:>8} {m['errors']:>6} {m['p50_ms']:>7} {m['p99_ms']:>7}")
    print(f"\n{'process':<40} {'RSS at 1 min MB':>15} {'RSS at end MB':>13} {'growth':>7} {'fds':>9}")
    for p in processes:
        print(f"{p['name']:<40} {p['rss_1min_mb']:>15} {p['rss_end_mb']:>13} {p['growth']:>7.1%} "
              f"{p['fds_1min']:>4}->{p['fds_end']:<4}")
    print(f"\n{len(records)} requests at {rate:.1f}/s, {result['errors']} errors")
    if args.out:
        write_result(args.out, **{k: v for k, v in result.items() if k != "samples"}, samples=samples)


async def _soak(url: str, requests: list[bytes], rate: float, seconds: float, server: psutil.Process,
                samples: list[dict]) -> list[loadgen.Record]:
    load = asyncio.create_task(loadgen.open_loop(url, requests, rate, seconds))
    start = time.monotonic()
    while not load.done():
        samples.append({"t": round(time.monotonic() - start, 1), "processes": _snapshot(server)})
        await asyncio.sleep(SAMPLE_S)
    return await load


def _snapshot(server: psutil.Process) -> dict[str, dict]:
    out = {}
    for p in [server, *server.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            kind = "worker" if "_bentoml_impl.worker" in cmd else ("bentoml serve" if p == server else p.name())
            out[f"{kind} (pid {p.pid})"] = {"rss_mb": round(p.memory_info().rss / 2**20, 1), "fds": p.num_fds()}
        except psutil.Error:
            continue
    return out


def _growth(samples: list[dict]) -> list[dict]:
    """Per process, RSS and fds at the first sample after one minute and at the last sample."""
    after_1min = next((s for s in samples if s["t"] >= 60), samples[0])
    last = samples[-1]
    rows = []
    for name, first in after_1min["processes"].items():
        end = last["processes"].get(name)
        if end is None:
            continue  # the process is gone (a restarted worker shows under a new pid)
        rows.append({"name": name, "rss_1min_mb": first["rss_mb"], "rss_end_mb": end["rss_mb"],
                     "growth": round(end["rss_mb"] / first["rss_mb"] - 1, 4), "fds_1min": first["fds"],
                     "fds_end": end["fds"]})
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


if __name__ == "__main__":
    main()

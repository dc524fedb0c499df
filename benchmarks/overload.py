"""Goodput under overload: what the service answers, and how fast it refuses, when offered k times what it can do.

    python benchmarks/overload.py --factor 4 --seconds 60 --out benchmarks/results/overload.json

Phases, against a fresh `bentoml serve` (one worker by default; --env to change settings):
1. capacity: 16 closed-loop clients for --capacity-seconds -> C successful images/s, measured again after
   the overload and averaged (this machine's capacity drifts by several percent from minute to minute);
2. normal: open loop at 0.5 C for 10 s -> the latency of a service that keeps up;
3. overload: open loop at k x C for --seconds, then straight on at 0.5 C for --recovery-seconds.
Reported: successful throughput during the overload as a share of C (goodput), p99 of successful answers
and of 503s, and recovery (from the end of the overload, the time after which, in every 250 ms bin, the
median latency is back under twice the normal median and nothing is refused). Requests are the hymenoptera val photos (500x375
JPEGs) sent raw to /classify by benchmarks/loadgen.py; the generator's own CPU share is reported.
`--server-dir DIR` serves another checkout of tuneserve (e.g. an older commit in a git worktree), for
before/after runs on the same machine.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
from pathlib import Path

import loadgen
from results_io import write_result

BIN_S = 0.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=4.0, help="offered load during overload, x capacity")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the overload")
    ap.add_argument("--capacity-seconds", type=float, default=20.0)
    ap.add_argument("--recovery-seconds", type=float, default=10.0)
    loadgen.add_server_arguments(ap)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    bodies = loadgen.photo_bodies(args.images)
    env = loadgen.server_env(args.env)
    with loadgen.serve(args.server_dir, env) as (url, _):
        requests = loadgen.build_requests(url, "/classify", bodies)
        loadgen.run(loadgen.closed_loop(url, requests, 16, 5))  # warm-up
        cap_records = loadgen.run(loadgen.closed_loop(url, requests, 16, args.capacity_seconds))
        capacity = sum(r.status == 200 for r in cap_records) / args.capacity_seconds
        normal = loadgen.run(loadgen.open_loop(url, requests, 0.5 * capacity, 10))
        normal_p50 = loadgen.percentile([r.latency for r in normal if r.status == 200], 50)
        cpu0 = _own_cpu()
        records = loadgen.run(_overload_then_recovery(url, requests, capacity, args))
        generator_cpu = (_own_cpu() - cpu0) / (args.seconds + args.recovery_seconds)
        after = loadgen.run(loadgen.closed_loop(url, requests, 16, args.capacity_seconds))
        capacity_after = sum(r.status == 200 for r in after) / args.capacity_seconds
        capacity_before, capacity = capacity, (capacity + capacity_after) / 2

    over = [r for r in records if r.due < args.seconds]
    ok = [r.latency for r in over if r.status == 200]
    shed = [r.latency for r in over if r.status == 503]
    other = sorted({r.status for r in over} - {200, 503})
    result = {
        "label": args.label, "env": env, "server_dir": str(args.server_dir or ""),
        "capacity_images_per_s": round(capacity, 1),
        "capacity_before_after": [round(capacity_before, 1), round(capacity_after, 1)],
        "normal_p50_ms": _ms(normal_p50),
        "normal_p99_ms": _ms(loadgen.percentile([r.latency for r in normal if r.status == 200], 99)),
        "factor": args.factor, "offered_per_s": round(args.factor * capacity_before, 1), "seconds": args.seconds,
        "goodput_images_per_s": round(len(ok) / args.seconds, 1),
        "goodput_share_of_capacity": round(len(ok) / args.seconds / capacity, 3),
        "ok_p50_ms": _ms(loadgen.percentile(ok, 50)), "ok_p99_ms": _ms(loadgen.percentile(ok, 99)),
        "shed": len(shed), "shed_share": round(len(shed) / max(1, len(over)), 3),
        "shed_p50_ms": _ms(loadgen.percentile(shed, 50)), "shed_p99_ms": _ms(loadgen.percentile(shed, 99)),
        "other_statuses": other, "failed_connections": sum(r.status == 0 for r in over),
        "goodput_share_by_10s": [round(sum(1 for r in over if r.status == 200 and t <= r.due < t + 10) / 10 / capacity, 3)
                                 for t in range(0, int(args.seconds), 10)],
        "recovery_s": _recovery(records, args.seconds, args.recovery_seconds, normal_p50),
        "generator_cpu_share_of_a_core": round(generator_cpu, 2),
    }
    for key, value in result.items():
        print(f"{key:32s} {value}")
    if args.out:
        write_result(args.out, **result)


async def _overload_then_recovery(url: str, requests: list[bytes], capacity: float, args) -> list[loadgen.Record]:
    """One open-loop schedule: k x C for the overload, then 0.5 C, with due times continuing across."""
    first = asyncio.create_task(loadgen.open_loop(url, requests, args.factor * capacity, args.seconds, seed=1))
    await asyncio.sleep(args.seconds)
    second = await loadgen.open_loop(url, requests, 0.5 * capacity, args.recovery_seconds, seed=2)
    return await first + [loadgen.Record(r.due + args.seconds, r.latency, r.status) for r in second]


def _recovery(records: list[loadgen.Record], end: float, span: float, normal_p50: float | None) -> float | None:
    """Seconds after the overload's end from which every bin is normal: median under 2 x normal, no 503."""
    if normal_p50 is None:
        return None
    limit = 2 * normal_p50
    bins: dict[int, list[loadgen.Record]] = {}
    for r in records:
        if r.due >= end:
            bins.setdefault(int((r.due - end) / BIN_S), []).append(r)
    recovered = None
    for b in sorted(bins):
        rs = bins[b]
        fine = all(r.status == 200 for r in rs) and loadgen.percentile([r.latency for r in rs], 50) <= limit
        if fine and recovered is None:
            recovered = b * BIN_S
        elif not fine:
            recovered = None
    return recovered if recovered is not None else span


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    main()

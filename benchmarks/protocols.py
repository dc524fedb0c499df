"""Our /classify against the Open Inference Protocol's infer route: images/s and latency at 16 and 64 clients.

    python benchmarks/protocols.py --out benchmarks/results/protocols.json

One fresh `bentoml serve` (default settings; --env to change them), the hymenoptera val photos sent one per
request: raw to /classify, and as a binary BYTES tensor to /v2/models/{name}/infer the way tritonclient sends
them (benchmarks/loadgen.py). Closed loop, --seconds per measurement after 3 s of warm-up, the two routes
alternated --rounds times at each client count (this machine's speed drifts by several percent).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import httpx

import loadgen
from results_io import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="16,64")
    loadgen.add_server_arguments(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    bodies = loadgen.photo_bodies(args.images)
    env = loadgen.server_env(args.env)
    runs: list[dict] = []
    with loadgen.serve(args.server_dir, env) as (url, _):
        name = httpx.get(f"{url}/model", timeout=30).json()["name"]
        v2 = dict(loadgen.v2_binary_body(b) for b in bodies)  # request body -> its headers
        routes = {
            "/classify": loadgen.build_requests(url, "/classify", bodies),
            "v2 infer (binary)": loadgen.build_requests(url, f"/v2/models/{name}/infer", list(v2), headers=v2.get),
        }
        for clients in (int(c) for c in args.clients.split(",")):
            for i in range(args.rounds):
                order = list(routes) if i % 2 == 0 else list(reversed(routes))
                for route in order:
                    loadgen.run(loadgen.closed_loop(url, routes[route], clients, 3))
                    records = loadgen.run(loadgen.closed_loop(url, routes[route], clients, args.seconds))
                    ok = [r.latency for r in records if r.status == 200]
                    runs.append({"route": route, "clients": clients, "round": i,
                                 "images_per_s": round(len(ok) / args.seconds, 1),
                                 "p50_ms": _ms(loadgen.percentile(ok, 50)), "p99_ms": _ms(loadgen.percentile(ok, 99)),
                                 "errors": len(records) - len(ok)})
                    print(runs[-1], flush=True)

    summary = []
    for clients in sorted({r["clients"] for r in runs}):
        for route in routes:
            rs = [r for r in runs if r["route"] == route and r["clients"] == clients]
            summary.append({"route": route, "clients": clients, "errors": sum(r["errors"] for r in rs),
                            **{k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "p50_ms", "p99_ms")}})
    print(f"\n{'route':20s} {'clients':>7} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}   (medians of {args.rounds})")
    for s in summary:
        print(f"{s['route']:20s} {s['clients']:>7} {s['images_per_s']:>7} {s['p50_ms']:>7} {s['p99_ms']:>7} {s['errors']:>6}")
    if args.out:
        write_result(args.out, env=env, seconds=args.seconds, summary=summary, runs=runs)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


if __name__ == "__main__":
    main()

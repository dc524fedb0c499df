"""Several models in one service: what an extra model costs, how models share the engine, and whether serving
one model got slower.

    python benchmarks/several_models.py --baseline-dir /tmp/pre --out benchmarks/results/several_models.json

Four parts, each against the built-in model (EfficientNet-Lite0) and copies of it registered under other
names in a temporary BentoML home:
1. memory: a one-worker server with 1, 2 and 3 models; the worker's resident memory after every model has
   answered, and throughput with 16 closed-loop clients spread over the models' /models/{name}/classify;
2. engine: in one process, two onnxruntime sessions fed batches of 8 by two threads for --seconds, either
   taking turns on one engine thread (what a worker does) or each on its own thread at once;
3. one model (with --baseline-dir, a checkout of an earlier commit): default settings, 16 closed-loop clients
   on /classify for --seconds, the two checkouts alternated --rounds times on fresh servers;
4. converge: with 2 workers, the seconds until every worker serves a new version, in poll mode from its
   registration and in explicit mode the management call's own time.
Requests are the hymenoptera val photos (500x375 JPEGs) sent raw (benchmarks/loadgen.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import loadgen
import numpy as np
from results_io import write_result
from tuneserve.service.process import running_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each measured load")
    ap.add_argument("--rounds", type=int, default=3, help="before/after alternations of the one-model part")
    ap.add_argument("--baseline-dir", type=Path, default=None, help="an earlier checkout for the one-model part")
    ap.add_argument("--parts", default="memory,engine,converge,one-model")
    loadgen.add_server_arguments(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    bodies = loadgen.photo_bodies(args.images)

    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as home:
        os.environ["BENTOML_HOME"] = home
        from tuneserve.models.store import save_model
        from tuneserve.training.builtin import ensure_builtin_model

        builtin = ensure_builtin_model()
        names = [builtin.tag.split(":")[0]] + [
            save_model(f"copy{i}", dataclasses.replace(builtin.card, files={}), builtin.onnx_path).tag.split(":")[0]
            for i in (1, 2)]
        result: dict = {"model": builtin.tag}
        if "memory" in parts:
            result["memory"] = [memory_row(names[:k], bodies, args) for k in (1, 2, 3)]
        if "engine" in parts:
            result["engine"] = engine_sharing(builtin.onnx_path, args.seconds)
        if "converge" in parts:
            result["converge"] = convergence(builtin, bodies[0], args)
        if "one-model" in parts and args.baseline_dir is not None:
            result["one_model"] = one_model(bodies, args)

    report(result)
    if args.out:
        write_result(args.out, **result)


def memory_row(names: list[str], bodies: list[bytes], args) -> dict:
    env = {**loadgen.server_env(args.env), "TUNESERVE_WORKERS": "1", "TUNESERVE_MODELS": ",".join(names)}
    with loadgen.serve(None, env) as (url, port):
        requests = [r for name in names for r in loadgen.build_requests(url, f"/models/{name}/classify", bodies)]
        loadgen.run(loadgen.closed_loop(url, requests, 16, 5))  # every model warmed up and answered
        records = loadgen.run(loadgen.closed_loop(url, requests, 16, args.seconds))
        (worker,) = loadgen.worker_processes(port)
        rss = worker.memory_info().rss
    ok = [r.latency for r in records if r.status == 200]
    return {"models": len(names), "worker_rss_mb": round(rss / 2**20, 1),
            "images_per_s": round(len(ok) / args.seconds, 1), "errors": len(records) - len(ok),
            "p50_ms": _ms(loadgen.percentile(ok, 50)), "p99_ms": _ms(loadgen.percentile(ok, 99))}


def engine_sharing(onnx_path: Path, seconds: float, batch: int = 8) -> dict:
    """Two sessions, two feeding threads: batches through one shared engine thread, or each session run from
    its own thread at the same time. Sessions as a CPU worker makes them (all cores, idle threads sleep)."""
    from engine import random_input
    from tuneserve.models.runtime import OnnxClassifier

    sessions = [OnnxClassifier(onnx_path, "cpu", intra_op_threads=os.cpu_count() or 1, spin=False) for _ in range(2)]
    x = random_input(sessions[0], batch, 224)
    for s in sessions:
        s(x)
    rows = {}
    for mode in ("shared", "separate"):
        engines = [ThreadPoolExecutor(1)] * 2 if mode == "shared" else [ThreadPoolExecutor(1) for _ in range(2)]
        latencies: list[list[float]] = [[], []]
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=_feed, args=(engines[i], sessions[i], x, stop, latencies[i]))
                   for i in range(2)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        for e in set(engines):
            e.shutdown()
        every = latencies[0] + latencies[1]
        rows[mode] = {"images_per_s": round(batch * len(every) / elapsed, 1),
                      "batch_p50_ms": _ms(loadgen.percentile(every, 50)),
                      "batch_p99_ms": _ms(loadgen.percentile(every, 99)),
                      "per_model_batches": [len(latencies[0]), len(latencies[1])]}
    return {"batch": batch, "threads_per_session": os.cpu_count(), **rows}


def _feed(engine: ThreadPoolExecutor, session, x: np.ndarray, stop: float, latencies: list[float]) -> None:
    """Run `session` on `x` through `engine` until `stop`, recording each batch's seconds."""
    while time.monotonic() < stop:
        t0 = time.monotonic()
        engine.submit(session, x).result()
        latencies.append(time.monotonic() - t0)


def convergence(builtin, body: bytes, args, changes: int = 3) -> dict:
    """Seconds from a change until every one of 2 workers serves the new version: poll mode (default
    interval) from the registration of a new version; explicit mode, the management call's own time (it
    answers once every worker serves the change)."""
    import httpx
    from tuneserve.models.store import save_model

    def register(name: str) -> str:
        return save_model(name, dataclasses.replace(builtin.card, files={}), builtin.onnx_path).version

    def versions(url: str, name: str) -> set[str]:
        """The versions 12 requests on fresh connections get (they land on either worker)."""
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            return {c.post(f"/models/{name}/classify", content=body).json()["model"].split(":")[1] for _ in range(12)}

    out: dict = {"workers": 2}
    register("poll-bench")
    with running_server(env={"TUNESERVE_MODELS": "poll-bench", "TUNESERVE_MODEL_CONTROL": "poll",
                             "TUNESERVE_WORKERS": "2"}) as url:
        from tuneserve.service.config import ServiceConfig

        seconds = []
        for _ in range(changes):
            t0 = time.monotonic()
            version = register("poll-bench")
            while versions(url, "poll-bench") != {version}:
                time.sleep(0.1)
            seconds.append(round(time.monotonic() - t0, 2))
        out["poll"] = {"interval_s": ServiceConfig().poll_interval_s, "seconds": seconds}
    first, second = register("explicit-bench"), register("explicit-bench")
    admin = {"Authorization": "Bearer benchmark-admin-key"}
    with running_server(env={"TUNESERVE_MODELS": f"explicit-bench:{first}", "TUNESERVE_MODEL_CONTROL": "explicit",
                             "TUNESERVE_ADMIN_KEY": admin["Authorization"][7:], "TUNESERVE_WORKERS": "2"}) as url, \
            httpx.Client(base_url=url, timeout=180) as c:
        seconds = []
        for i in range(changes):
            t0 = time.monotonic()
            target = second if i % 2 == 0 else first
            r = c.post("/v2/repository/models/explicit-bench/load", json={"version": target}, headers=admin)
            r.raise_for_status()
            seconds.append(round(time.monotonic() - t0, 2))
            assert versions(url, "explicit-bench") == {target}
        out["explicit"] = {"seconds": seconds}
    return out


def one_model(bodies: list[bytes], args) -> dict:
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, server_dir in (("before", args.baseline_dir), ("after", None)):
            with loadgen.serve(server_dir, loadgen.server_env(args.env)) as (url, _):
                requests = loadgen.build_requests(url, "/classify", bodies)
                loadgen.run(loadgen.closed_loop(url, requests, 16, 5))
                records = loadgen.run(loadgen.closed_loop(url, requests, 16, args.seconds))
            ok = [r.latency for r in records if r.status == 200]
            runs[label].append({"images_per_s": round(len(ok) / args.seconds, 1),
                                "p50_ms": _ms(loadgen.percentile(ok, 50)), "p99_ms": _ms(loadgen.percentile(ok, 99)),
                                "errors": len(records) - len(ok)})
    median = {label: {k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "p50_ms", "p99_ms")}
              for label, rs in runs.items()}
    return {"baseline_dir": str(args.baseline_dir), "rounds": runs, "median": median}


def report(result: dict) -> None:
    if "memory" in result:
        print(f"{'models':>6} {'worker RSS MB':>13} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
        for r in result["memory"]:
            print(f"{r['models']:>6} {r['worker_rss_mb']:>13} {r['images_per_s']:>7} {r['p50_ms']:>7} "
                  f"{r['p99_ms']:>7} {r['errors']:>6}")
    if "engine" in result:
        e = result["engine"]
        print(f"\nengine, 2 models, batch {e['batch']}: {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
        for mode in ("shared", "separate"):
            print(f"{mode:>29}: {e[mode]['images_per_s']:>7} {e[mode]['batch_p50_ms']:>7} {e[mode]['batch_p99_ms']:>7}")
    if "converge" in result:
        c = result["converge"]
        print(f"\nevery worker of {c['workers']} serves a new version after, s:")
        print(f"  poll (every {c['poll']['interval_s']} s), from its registration: {c['poll']['seconds']}")
        print(f"  explicit, the management call: {c['explicit']['seconds']}")
    if "one_model" in result:
        print(f"\none model (median of {len(result['one_model']['rounds']['after'])}): "
              f"{'img/s':>7} {'p50 ms':>7} {'p99 ms':>7}")
        for label, m in result["one_model"]["median"].items():
            print(f"{label:>31}: {m['images_per_s']:>7} {m['p50_ms']:>7} {m['p99_ms']:>7}")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    main()

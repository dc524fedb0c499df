"""Closed-loop HTTP load against the tuneserve service, compared with the same model in onnxruntime alone.

    # one command: start the service, load it for 30 s, stop it, measure the engine alone, write JSON
    python benchmarks/serve_load.py --start --model imagenet-efficientnet_lite0 --concurrency 16 \\
        --duration 30 --images ../shared/datasets/hymenoptera/val --out benchmarks/results/serve.json
    # batching off (one image per onnxruntime call), for comparison
    python benchmarks/serve_load.py --start --max-batch-size 1 ...
    # against a service that is already running
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 --concurrency 16 --duration 30 --images DIR

`--concurrency` clients each send a request, wait for the answer and send the next one (closed loop), for
`--duration` seconds after a short warm-up (which also takes BentoML's batcher past its calibration).
Requests go to /classify with one image as the raw body, or with `--batch-images N` to /classify_batch
with N images each. Reported: images/s, request latency p50/p95/p99, errors by status, the batch sizes
the server ran (from its Prometheus histogram), and the engine alone: onnxruntime on the same ONNX file,
same provider, on already-preprocessed images, at the batch size the server averaged and at its largest
one. end-to-end ÷ engine-alone is the share of the engine's throughput that survives HTTP, decoding,
preprocessing and batching. Also measured: decode + preprocess cost per image on one thread.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:3000", help="service to load (ignored with --start)")
    ap.add_argument("--start", action="store_true", help="start the service (bentoml serve) on a free port, stop it after")
    ap.add_argument("--model", default=None, help="with --start: model tag (default: the built-in model)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="with --start: TUNESERVE_MAX_BATCH_SIZE (1 = batching off)")
    ap.add_argument("--max-latency-ms", type=int, default=None, help="with --start: TUNESERVE_MAX_LATENCY_MS")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="with --start: any other service setting, e.g. TUNESERVE_PREPROCESS_THREADS=3 (repeatable)")
    ap.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--batch-images", type=int, default=1, help="images per request: 1 -> /classify, N > 1 -> /classify_batch")
    ap.add_argument("--engine-seconds", type=float, default=3.0, help="seconds per engine-alone measurement")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'batching off')")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.concurrency < 1 or args.batch_images < 1 or args.duration <= 0:
        ap.error("--concurrency and --batch-images must be >= 1 and --duration > 0")

    images = load_images(Path(args.images))
    if args.start:
        from service.process import running_server

        env = {k: str(v) for k, v in {"TUNESERVE_MODEL": args.model, "TUNESERVE_MAX_BATCH_SIZE": args.max_batch_size,
                                      "TUNESERVE_MAX_LATENCY_MS": args.max_latency_ms}.items() if v is not None}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep:
                ap.error(f"--env takes NAME=VALUE, got {item!r}")
            env[name] = value
        with running_server(env=env) as url:
            report = run_load(url, images, args)
    else:
        report = run_load(args.url.rstrip("/"), images, args)
    # After the load, with the server stopped (--start) or idle: the engine gets the machine to itself.
    report["engine"] = engine_alone(report["server"]["tag"], report["server"]["runtime"]["provider"], images,
                                    report["server_batches"], report["server"]["batching"], args.batch_images,
                                    args.engine_seconds, report["server"]["runtime"].get("intra_op_threads", 0))
    report["preprocess_ms_per_image"] = preprocess_cost(report["server"]["tag"], images)
    e2e = report["load"]["images_per_s"]
    report["ratio"] = {k: e2e / v for k, v in (("vs_engine_at_mean_batch", report["engine"]["at_mean_batch"]),
                                               ("vs_engine_best", report["engine"]["best_images_per_s"])) if v}
    report.update(date=time.strftime("%Y-%m-%d"), machine=machine(), command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  label=args.label)
    print_report(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwritten: {args.out}")


def load_images(folder: Path, limit: int = 256) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


# -- load ----------------------------------------------------------------------------------------------------

def run_load(url: str, images: list[tuple[str, bytes]], args: argparse.Namespace) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=30) as c:
        server = c.get("/model").json()
    stats = asyncio.run(closed_loop(url, images, args))
    return {"url": url, "server": {k: server[k] for k in ("tag", "arch", "runtime", "batching", "limits")}, **stats}


async def closed_loop(url: str, images: list[tuple[str, bytes]], args: argparse.Namespace) -> dict[str, Any]:
    n = args.batch_images
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counted = {"requests": 0, "images": 0}
    measuring = False
    rng = random.Random(0)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one_request() -> None:
            picked = [images[rng.randrange(len(images))] for _ in range(n)]
            t0 = time.perf_counter()
            try:
                if n == 1:
                    r = await client.post("/classify", content=picked[0][1])
                else:
                    r = await client.post("/classify_batch", files=[("images", img) for img in picked])
                status = str(r.status_code)
                ok = r.status_code == 200 and (n == 1 or all("predictions" in x for x in r.json()["results"]))
            except httpx.HTTPError as e:
                status, ok = type(e).__name__, False
            if not measuring:
                return
            latencies.append(time.perf_counter() - t0)
            counted["requests"] += 1
            if ok:
                counted["images"] += n
            else:
                errors[status] = errors.get(status, 0) + 1

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one_request()

        await asyncio.gather(*(worker(time.perf_counter() + args.warmup) for _ in range(args.concurrency)))
        before = (await client.get("/metrics")).text
        measuring = True
        start, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(start + args.duration) for _ in range(args.concurrency)))
        elapsed, client_cpu = time.perf_counter() - start, time.process_time() - cpu0
        measuring = False
        after = (await client.get("/metrics")).text

    lat_ms = sorted(x * 1000 for x in latencies)
    return {
        "load": {
            "concurrency": args.concurrency, "batch_images": n, "duration_s": round(elapsed, 2),
            "requests": counted["requests"], "images": counted["images"], "errors": errors,
            # The load generator runs on the same machine: the CPU it takes is the server's loss.
            "client_cpu_share": client_cpu / elapsed / (os.cpu_count() or 1),
            "images_per_s": counted["images"] / elapsed,
            "latency_ms": {"p50": pct(lat_ms, 50), "p95": pct(lat_ms, 95), "p99": pct(lat_ms, 99),
                           "mean": statistics.fmean(lat_ms) if lat_ms else None},
        },
        "server_batches": batch_histogram(before, after),
    }


def pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return float(np.percentile(sorted_values, q))


_METRIC = re.compile(r'^bentoml_service_adaptive_batch_size_(bucket|sum|count)\{([^}]*)\} ([0-9.e+]+)$', re.M)


def batch_histogram(before: str, after: str) -> dict[str, Any]:
    """Inference calls during the measured window and their mean size, from BentoML's histogram (which counts
    requests per call: for /classify_batch each request holds --batch-images images)."""
    def read(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, labels, value in _METRIC.findall(text):
            if 'method_name="infer"' not in labels:
                continue
            le = re.search(r'le="([^"]+)"', labels)
            key = f"le_{le.group(1)}" if kind == "bucket" and le else kind
            out[key] = out.get(key, 0.0) + float(value)
        return out

    b, a = read(before), read(after)
    delta = {k: a[k] - b.get(k, 0.0) for k in a}
    calls = delta.get("count", 0.0)
    return {"calls": int(calls), "mean_requests_per_call": (delta["sum"] / calls) if calls else None,
            "buckets": {k[3:]: int(v) for k, v in sorted(delta.items(), key=lambda kv: float(kv[0][3:])
                        if kv[0].startswith("le_") and kv[0] != "le_+Inf" else float("inf")) if k.startswith("le_")}}


# -- engine alone -----------------------------------------------------------------------------------------------

def engine_alone(tag: str, provider: str, images: list[tuple[str, bytes]], batches: dict[str, Any],
                 batching: dict[str, Any], images_per_request: int, seconds: float,
                 server_threads: int) -> dict[str, Any]:
    from models.preprocessing import preprocess
    from models.runtime import OnnxClassifier
    from models.store import load_model

    model = load_model(tag)
    device = "cuda" if provider.startswith("CUDA") else "cpu"
    pool = np.stack([preprocess(data, model.card.preprocessing) for _, data in images[:64]])
    sizes = {1, batching["max_batch_size"]}
    # Images per inference call: requests per call x images per request, as BentoML splits a request
    # that does not fit into the current batch. With batching off every call is one request.
    mean_images = min((batches["mean_requests_per_call"] or 1.0) * images_per_request, batching["max_batch_size"])
    sizes.add(max(1, round(mean_images)))

    def measure(threads: int) -> tuple[str, dict[int, float]]:
        session = OnnxClassifier(model.onnx_path, device=device, intra_op_threads=threads)
        by_batch = {}
        for b in sorted(sizes):
            x = np.concatenate([pool] * (b // len(pool) + 1))[:b]
            session(x)  # warm-up for this shape
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                session(x)
                n += b
            by_batch[b] = n / (time.perf_counter() - t0)
        return session.providers[0], by_batch

    # The reference is the engine with the machine to itself (onnxruntime's default threads); the
    # server's own thread setting is measured too when it differs.
    used_provider, by_batch = measure(0)
    result = {"provider": used_provider, "intra_op_threads": "default", "images_per_s_by_batch": by_batch,
              "mean_batch": mean_images, "at_mean_batch": by_batch[max(1, round(mean_images))],
              "best_images_per_s": max(by_batch.values())}
    if server_threads:
        result[f"images_per_s_by_batch_with_{server_threads}_threads"] = measure(server_threads)[1]
    return result


def preprocess_cost(tag: str, images: list[tuple[str, bytes]]) -> float:
    from models.preprocessing import preprocess
    from models.store import load_model

    pp = load_model(tag).card.preprocessing
    sample = images[:64]
    t0 = time.perf_counter()
    for _, data in sample:
        preprocess(data, pp)
    return (time.perf_counter() - t0) * 1000 / len(sample)


# -- report -----------------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def print_report(r: dict[str, Any]) -> None:
    load, srv, eng = r["load"], r["server"], r["engine"]
    b = srv["batching"]
    print(f"\nservice {srv['tag']} on {srv['runtime']['provider']}, batching "
          + (f"max_batch_size={b['max_batch_size']} max_latency_ms={b['max_latency_ms']}" if b["enabled"] else "off"))
    print(f"load: {load['concurrency']} clients x {load['batch_images']} image(s)/request for {load['duration_s']} s")
    lat = load["latency_ms"]
    print(f"end-to-end: {load['images_per_s']:.1f} img/s, {load['requests']} requests, latency p50 {fmt(lat['p50'])} "
          f"p95 {fmt(lat['p95'])} p99 {fmt(lat['p99'])} ms, errors {load['errors'] or 'none'}")
    sb = r["server_batches"]
    if sb["calls"]:
        print(f"server: {sb['calls']} inference calls, {sb['mean_requests_per_call']:.2f} requests per call; "
              f"histogram (<= size: calls) {sb['buckets']}")
    print("engine alone: " + ", ".join(f"batch {k}: {v:.1f} img/s" for k, v in eng["images_per_s_by_batch"].items()))
    for key in (k for k in eng if k.startswith("images_per_s_by_batch_with_")):
        print(f"  with {key.split('_with_')[1].replace('_', ' ')}: "
              + ", ".join(f"batch {k}: {v:.1f} img/s" for k, v in eng[key].items()))
    print(f"load generator: {load['client_cpu_share']:.0%} of the machine's CPU")
    print(f"decode + preprocess: {r['preprocess_ms_per_image']:.2f} ms/image on one thread")
    for k, v in r["ratio"].items():
        print(f"end-to-end / engine {k[10:].replace('_', ' ')}: {v:.2f}")


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()

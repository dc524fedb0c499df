"""HTTP load (closed or open loop) against the tuneserve service, compared with the same model in onnxruntime alone.

    # one command: start the service, load it for 30 s, stop it, measure the engine alone, write JSON
    python benchmarks/serve_load.py --start --model imagenet-efficientnet_lite0 --concurrency 16 \\
        --duration 30 --images ../shared/datasets/hymenoptera/val --out benchmarks/results/serve.json
    # batching off (one image per onnxruntime call), for comparison
    python benchmarks/serve_load.py --start --max-batch-size 1 ...
    # against a service that is already running
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 --concurrency 16 --duration 30 --images DIR
    # open loop: fixed arrival rates, one point each -> latency-throughput curve
    python benchmarks/serve_load.py --start --rate 25,50,100,150 --duration 20 --images DIR
    # a GPU machine: more load-generator processes, 256 closed-loop clients
    python benchmarks/serve_load.py --start --concurrency 256 --processes 8 --images DIR

`--concurrency` clients each send a request, wait for the answer and send the next one (closed loop), for
`--duration` seconds after a short warm-up (which also takes BentoML's batcher past its calibration).
Requests go to /classify with one image as the raw body, or with `--batch-images N` to /classify_batch
with N images each. Reported: images/s, request latency p50/p95/p99, errors by status, the batch sizes
the server ran (from its Prometheus histogram), and the engine alone: onnxruntime on the same ONNX file,
same provider, on already-preprocessed images, at the batch size the server averaged and at its largest
one. end-to-end ÷ engine-alone is the share of the engine's throughput that survives HTTP, decoding,
preprocessing and batching. Also measured: decode + preprocess cost per image on one thread, the
machine's CPU utilisation and (where nvidia-smi exists) the GPU's during the measured window.

`--rate R1,R2,...` replaces the closed loop by an open one: requests arrive at a fixed rate whatever the
answers, and latency counts from each request's scheduled time, so an overloaded server shows rising
latency and errors rather than a politely slowed-down client.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from results_io import write_result
from tuneserve.service.engine.batch_metrics import batch_sizes_between

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
    ap.add_argument("--rate", default=None, metavar="R[,R...]",
                    help="open loop instead: requests/s at a fixed arrival rate; several rates give a latency-throughput curve")
    ap.add_argument("--processes", type=int, default=1, help="load-generator processes (one does a few thousand requests/s)")
    ap.add_argument("--max-connections", type=int, default=256, help="open loop: HTTP connections per generator process")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of measured load")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    ap.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ap.add_argument("--batch-images", type=int, default=1, help="images per request: 1 -> /classify, N > 1 -> /classify_batch")
    ap.add_argument("--engine-seconds", type=float, default=3.0, help="seconds per engine-alone measurement")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'batching off')")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.concurrency < 1 or args.batch_images < 1 or args.duration <= 0 or args.processes < 1:
        ap.error("--concurrency, --batch-images and --processes must be >= 1 and --duration > 0")
    try:
        rates = [float(r) for r in args.rate.split(",")] if args.rate else [None]
    except ValueError:
        ap.error(f"--rate takes requests/s as numbers separated by commas, got {args.rate!r}")
    if any(r is not None and r <= 0 for r in rates):
        ap.error(f"--rate values must be > 0, got {args.rate!r}")

    images = load_images(Path(args.images))
    if args.start:
        from tuneserve.service.process import running_server

        env = {k: str(v) for k, v in {"TUNESERVE_MODEL": args.model, "TUNESERVE_MAX_BATCH_SIZE": args.max_batch_size,
                                      "TUNESERVE_MAX_LATENCY_MS": args.max_latency_ms}.items() if v is not None}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep:
                ap.error(f"--env takes NAME=VALUE, got {item!r}")
            env[name] = value
        with running_server(env=env) as url:
            runs = [run_load(url, images, args, rate) for rate in rates]
    else:
        runs = [run_load(args.url.rstrip("/"), images, args, rate) for rate in rates]
    # The point with the most images/s stands for the run; an open-loop sweep keeps every point as its curve.
    report = max(runs, key=lambda r: r["load"]["images_per_s"])
    if args.rate:
        report["curve"] = [{**r["load"], "server_batches": r["server_batches"]} for r in runs]
    # After the load, with the server stopped (--start) or idle: the engine gets the machine to itself.
    report["engine"] = engine_alone(report["server"]["tag"], report["server"]["runtime"]["provider"], images,
                                    report["server_batches"], report["server"]["batching"], args.batch_images,
                                    args.engine_seconds, report["server"]["runtime"].get("intra_op_threads", 0))
    report["preprocess_ms_per_image"] = preprocess_cost(report["server"]["tag"], images)
    e2e = report["load"]["images_per_s"]
    report["ratio"] = {k: e2e / v for k, v in (("vs_engine_at_mean_batch", report["engine"]["at_mean_batch"]),
                                               ("vs_engine_best", report["engine"]["best_images_per_s"])) if v}
    report.update(machine=machine(), label=args.label)
    print_report(report)
    if args.out:
        write_result(Path(args.out), **report)


def load_images(folder: Path, limit: int = 256) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return [(p.name, p.read_bytes()) for p in paths]


# -- load ----------------------------------------------------------------------------------------------------
#
# The generator runs in --processes processes (one Python process tops out at a few thousand requests/s),
# all working to one wall-clock schedule: warm-up until `start`, measure until `end`. Only requests that
# start (closed loop) or are scheduled (open loop) inside [start, end) count. Open-loop latency runs from
# the scheduled send time, not the actual one, so a generator or server that falls behind shows as latency
# instead of silently sending less (coordinated omission).

def run_load(url: str, images: list[tuple[str, bytes]], args: argparse.Namespace, rate: float | None = None) -> dict[str, Any]:
    import multiprocessing as mp

    with httpx.Client(base_url=url, timeout=30) as c:
        server = c.get("/model").json()
    procs = max(1, args.processes)
    start = time.time() + 1.0 + args.warmup  # 1 s for the processes to come up
    end = start + args.duration
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        jobs = [pool.apply_async(generate, (url, images, args.batch_images, _share(args.concurrency, procs, i),
                                            None if rate is None else rate / procs, start, end, args.max_connections, i))
                for i in range(procs)]
        time.sleep(max(0.0, start - time.time()))
        with httpx.Client(base_url=url, timeout=30) as c, Sampler() as sampler:
            before = c.get("/metrics").text
            time.sleep(max(0.0, end - time.time()))
            after = c.get("/metrics").text
        parts = [j.get(timeout=args.duration + 600) for j in jobs]

    latencies = sorted(x * 1000 for part in parts for x in part["latencies"])
    errors: dict[str, int] = {}
    for part in parts:
        for k, v in part["errors"].items():
            errors[k] = errors.get(k, 0) + v
    requests = sum(p["requests"] for p in parts)
    n_images = sum(p["images"] for p in parts)
    load = {
        "mode": "closed" if rate is None else "open", "concurrency": args.concurrency if rate is None else None,
        "rate_requests_per_s": rate, "batch_images": args.batch_images, "processes": procs,
        "duration_s": args.duration, "requests": requests, "images": n_images, "errors": errors,
        "error_share": (sum(errors.values()) / requests) if requests else None,
        # The load generator runs on the same machine: the CPU it takes is the server's loss.
        # Over each generator's whole life; near 1/processes per process means the generator, not the server,
        # limits what is offered (past saturation, httpx spends its CPU on thousands of queued requests).
        "client_cpu_share": sum(p["cpu_s"] for p in parts) / max(p["wall_s"] for p in parts) / (os.cpu_count() or 1),
        "images_per_s": n_images / args.duration,
        "latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95), "p99": pct(latencies, 99),
                       "mean": statistics.fmean(latencies) if latencies else None},
        **sampler.summary(),
    }
    return {"url": url, "server": {k: server[k] for k in ("tag", "arch", "runtime", "batching", "limits")},
            "load": load, "server_batches": batch_sizes_between(before, after)}


def _share(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


def generate(url: str, images: list[tuple[str, bytes]], n: int, clients: int, rate: float | None,
             start: float, end: float, max_connections: int, seed: int) -> dict[str, Any]:
    """One generator process: `clients` closed-loop clients, or open-loop arrivals at `rate` requests/s."""
    return asyncio.run(_generate(url, images, n, clients, rate, start, end, max_connections, seed))


async def _generate(url, images, n, clients, rate, start, end, max_connections, seed) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {"latencies": [], "requests": 0, "images": 0, "errors": {}}
    conns = clients if rate is None else max_connections
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    cpu0, wall0 = time.process_time(), time.time()

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def request(t_sched: float) -> None:
            picked = [images[rng.randrange(len(images))] for _ in range(n)]
            try:
                if n == 1:
                    r = await client.post("/classify", content=picked[0][1])
                else:
                    r = await client.post("/classify_batch", files=[("images", img) for img in picked])
                status = str(r.status_code)
                ok = r.status_code == 200 and (n == 1 or all("predictions" in x for x in r.json()["results"]))
            except httpx.HTTPError as e:
                status, ok = type(e).__name__, False
            if not start <= t_sched < end:
                return
            out["latencies"].append(time.time() - t_sched)
            out["requests"] += 1
            if ok:
                out["images"] += n
            else:
                out["errors"][status] = out["errors"].get(status, 0) + 1

        if rate is None:
            async def closed_client() -> None:
                while time.time() < end:
                    await request(time.time())
            await asyncio.gather(*(closed_client() for _ in range(clients)))
        else:
            # Fixed arrival rate from the start of warm-up; each arrival is its own task.
            t, k, tasks = time.time(), 0, []
            while (t_next := t + k / rate) < end:
                delay = t_next - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(request(t_next)))
                k += 1
            await asyncio.gather(*tasks)
    out["cpu_s"] = time.process_time() - cpu0
    out["wall_s"] = time.time() - wall0  # warm-up, window, and the wait for the last answers
    return out


class Sampler:
    """Machine CPU utilisation (/proc/stat) and GPU utilisation (nvidia-smi, where present) over the window."""

    def __enter__(self) -> "Sampler":
        import shutil
        import threading

        self._cpu0 = _cpu_times()
        self._gpu: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._sample_gpu, daemon=True)
            self._thread.start()
        return self

    def _sample_gpu(self) -> None:
        import subprocess

        while not self._stop.wait(0.5):
            r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                self._gpu.append(float(r.stdout.split()[0]))

    def __exit__(self, *exc: object) -> None:
        self._cpu1 = _cpu_times()
        self._stop.set()
        if self._thread:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        (busy0, total0), (busy1, total1) = self._cpu0, self._cpu1
        cpu = (busy1 - busy0) / (total1 - total0) if total1 > total0 else None
        return {"machine_cpu_util": cpu, "gpu_util_mean": statistics.fmean(self._gpu) if self._gpu else None}


def _cpu_times() -> tuple[float, float]:
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return float(np.percentile(sorted_values, q))


# -- engine alone -----------------------------------------------------------------------------------------------

def engine_alone(tag: str, provider: str, images: list[tuple[str, bytes]], batches: dict[str, Any],
                 batching: dict[str, Any], images_per_request: int, seconds: float,
                 server_threads: int) -> dict[str, Any]:
    from tuneserve.models.preprocessing import preprocess_pixels
    from tuneserve.models.runtime import OnnxClassifier
    from tuneserve.models.store import load_model

    model = load_model(tag)
    device = "cuda" if provider.startswith("CUDA") else "cpu"
    pixels = np.stack([preprocess_pixels(data, model.card.preprocessing) for _, data in images[:64]])
    sizes = {1, batching["max_batch_size"], images_per_request}
    # With batching off every call is one request (of images_per_request images).
    mean_images = batches["mean_images_per_call"] or float(images_per_request)
    sizes.add(max(1, round(mean_images)))

    def measure(threads: int) -> tuple[str, dict[int, float]]:
        session = OnnxClassifier(model.onnx_path, device=device, intra_op_threads=threads)
        pool = session.inputs(pixels, model.card.preprocessing)
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
    """ms of one core per image to decode, resize and crop (what a worker's decoding threads do)."""
    from tuneserve.models.preprocessing import preprocess_pixels
    from tuneserve.models.store import load_model

    pp = load_model(tag).card.preprocessing
    sample = images[:64]
    t0 = time.perf_counter()
    for _, data in sample:
        preprocess_pixels(data, pp)
    return (time.perf_counter() - t0) * 1000 / len(sample)


# -- report -----------------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def print_report(r: dict[str, Any]) -> None:
    load, srv, eng = r["load"], r["server"], r["engine"]
    if "curve" in r:
        print("\nopen loop: offered rate -> served")
        print(f"{'req/s offered':>14} {'img/s served':>13} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'CPU':>5} {'GPU':>5}")
        for point in r["curve"]:
            lat = point["latency_ms"]
            print(f"{point['rate_requests_per_s']:>14.0f} {point['images_per_s']:>13.1f} {point['error_share'] or 0:>7.1%} "
                  f"{fmt(lat['p50']):>8} {fmt(lat['p95']):>8} {fmt(lat['p99']):>8} "
                  f"{pct_or_dash(point['machine_cpu_util']):>5} {pct_or_dash(point['gpu_util_mean'], 100):>5}")
    b = srv["batching"]
    print(f"\nservice {srv['tag']} on {srv['runtime']['provider']}, batching "
          + (f"max_batch_size={b['max_batch_size']} max_latency_ms={b['max_latency_ms']}" if b["enabled"] else "off"))
    what = (f"{load['concurrency']} clients" if load["mode"] == "closed"
            else f"open loop at {load['rate_requests_per_s']:.0f} requests/s")
    print(f"load: {what} x {load['batch_images']} image(s)/request for {load['duration_s']} s, "
          f"{load['processes']} generator process(es)")
    lat = load["latency_ms"]
    print(f"end-to-end: {load['images_per_s']:.1f} img/s, {load['requests']} requests, latency p50 {fmt(lat['p50'])} "
          f"p95 {fmt(lat['p95'])} p99 {fmt(lat['p99'])} ms, errors {load['errors'] or 'none'}")
    sb = r["server_batches"]
    if sb["calls"]:
        print(f"server: {sb['calls']} inference calls, {sb['mean_images_per_call']:.2f} images per call; "
              f"histogram (<= size: calls) {sb['buckets']}")
    print("engine alone: " + ", ".join(f"batch {k}: {v:.1f} img/s" for k, v in eng["images_per_s_by_batch"].items()))
    for key in (k for k in eng if k.startswith("images_per_s_by_batch_with_")):
        print(f"  with {key.split('_with_')[1].replace('_', ' ')}: "
              + ", ".join(f"batch {k}: {v:.1f} img/s" for k, v in eng[key].items()))
    print(f"load generator: {load['client_cpu_share']:.0%} of the machine's CPU; machine CPU busy "
          f"{pct_or_dash(load['machine_cpu_util'])}, GPU busy {pct_or_dash(load['gpu_util_mean'], 100)}")
    print(f"decode + preprocess: {r['preprocess_ms_per_image']:.2f} ms/image on one thread")
    for k, v in r["ratio"].items():
        print(f"end-to-end / engine {k[10:].replace('_', ' ')}: {v:.2f}")


def pct_or_dash(v: float | None, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v / scale:.0%}"


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()

"""The Open Inference Protocol over REST against the same over gRPC: images/s and the p50/p99 of successful
answers at 16 and 64 closed-loop requests in flight, one server, one model, one photo, measured interleaved.

    apt-get install wrk                                  # the REST load
    .venv/bin/python benchmarks/protocols_load.py --out benchmarks/results/protocols_load.json
    .venv/bin/python benchmarks/protocols_load.py --levels 16 --rounds 1 --seconds 2 --warmup 0 --out /tmp/p.json  # smoke

One `bentoml serve` with default settings and gRPC on a free port (TUNESERVE_GRPC_PORT), serving the built-in
ImageNet Lite0 from a temporary model store (or --bentoml-home). Every request is the same photo (a hymenoptera
validation JPEG, or a generated 500x375 JPEG without ../shared), one image per request: over REST as
tritonclient.http sends it (POST /v2/models/{name}/infer, a JSON header then the BYTES element, binary output),
over gRPC as tritonclient.grpc does (ModelInfer, the JPEG as a 4-byte-length-prefixed BYTES element in
raw_input_contents). Before the load, both answers for the photo must agree within 1e-6. Then for each level
and round, REST and gRPC (the order alternating per round, as this machine's speed drifts), --warmup seconds
unmeasured and --seconds measured each.

REST's load is wrk with benchmarks/wrk/goodput.lua (one connection per thread, the 200s timed apart from the
rest), as benchmarks/goodput.py drives it. gRPC's is a Python grpc.aio generator, because wrk speaks no gRPC:
N tasks, each sending its next ModelInfer when the previous one answers, over one channel (one HTTP/2
connection) per --tasks-per-channel tasks, so that both BentoML workers, which share the gRPC port with
SO_REUSEPORT, get connections (the kernel spreads connections, not calls; each run records the spread). The
clients share the machine with the server, so each run records its client's CPU seconds per second: wrk's (this
process's reaped children) and the generator's (this process), beside the figures they produced.

Triton users measure servers with perf_analyzer instead (`-i http` and `-i grpc`, `--concurrency-range 16:64:48`,
a JPEG in its --input-data JSON): docs/serving.md shows the two commands against tuneserve. Its wheels are not
on the package index this project reaches, so it is not run here.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

import goodput  # benchmarks/goodput.py: its wrk() and compare_photo()
import loadgen
from results_io import write_result

PROTOCOLS = ("rest", "grpc")
AGREEMENT_TOL = 1e-6
CALL_TIMEOUT_S = 30.0  # as wrk's --timeout in goodput.wrk()
GRPC_LOG_LINE = "Open Inference Protocol over gRPC on"  # each worker logs it once its gRPC server listens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="16,64", help="closed-loop requests in flight, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="REST/gRPC pairs per level (the order alternates)")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per (protocol, level, round)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each measurement")
    ap.add_argument("--tasks-per-channel", type=int, default=4, help="gRPC tasks per channel, i.e. per HTTP/2 "
                    "connection (default 4: 16 tasks get 4 connections for the kernel to spread over the workers)")
    goodput.add_load_arguments(ap)
    args = ap.parse_args()
    goodput.require_wrk()
    levels = parse_levels(args.levels)
    if args.rounds < 1 or args.seconds <= 0 or args.warmup < 0 or args.tasks_per_channel < 1:
        sys.exit(f"error: --rounds and --tasks-per-channel must be >= 1, --seconds > 0 and --warmup >= 0, got "
                 f"{args.rounds}, {args.tasks_per_channel}, {args.seconds} and {args.warmup}")
    photo = args.photo.read_bytes() if args.photo else goodput.compare_photo()
    work = Path(tempfile.mkdtemp(prefix="tuneserve-protocols-load-"))
    goodput.builtin_model(args.bentoml_home or work / "bentoml")
    from tuneserve.service.process import free_port, running_server

    port, grpc_port = free_port(), free_port()
    runs: list[dict] = []
    with running_server(env={"TUNESERVE_GRPC_PORT": str(grpc_port)}, port=port, log_path=work / "server.log") as url:
        workers = wait_grpc_workers(port, work / "server.log")
        name = httpx.get(f"{url}/model", timeout=30).json()["name"]
        body, headers = loadgen.v2_binary_body(photo)
        body_path = work / "v2-body.bin"
        body_path.write_bytes(body)
        request = grpc_request(name, photo)
        target = f"127.0.0.1:{grpc_port}"
        agreement = check_agreement(url, name, body, headers, target, request)
        print(f"model {name!r}, {len(workers)} workers, REST and gRPC agree within {agreement:.2g}", flush=True)
        measure = {
            "rest": lambda level, s, out: rest_load(url, name, body_path, headers, level, s, out),
            "grpc": lambda level, s, out: grpc_load(target, request, level, s, args.tasks_per_channel, workers, grpc_port),
        }
        for level in levels:
            for i in range(args.rounds):
                for protocol in PROTOCOLS if i % 2 == 0 else PROTOCOLS[::-1]:
                    if args.warmup > 0:
                        measure[protocol](level, args.warmup, work / "warmup.json")
                    result = measure[protocol](level, args.seconds, work / "run.json")
                    runs.append({"protocol": protocol, "concurrency": level, "round": i, **result})
                    print(json.dumps(runs[-1]), flush=True)
    summary = summarise(runs)
    print_table(summary, args.rounds)
    if args.out:
        write_result(args.out, model=name, photo_bytes=len(photo), levels=levels, rounds=args.rounds,
                     seconds=args.seconds, warmup=args.warmup, tasks_per_channel=args.tasks_per_channel,
                     workers=len(workers), agreement_max_diff=agreement, summary=summary, runs=runs,
                     versions=versions())


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        sys.exit(f"error: --levels takes positive integers, comma-separated, got {text!r}")
    return levels


def wait_grpc_workers(port: int, log_path: Path, timeout_s: float = 120.0) -> list:
    """The server's worker processes, once each has logged its gRPC start: ready means one worker serves, and a
    gRPC connection the kernel hands to a worker still starting would wait for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = loadgen.worker_processes(port)
        started = log_path.read_text(errors="replace").count(GRPC_LOG_LINE)
        if workers and started >= len(workers):
            return workers
        time.sleep(0.3)
    sys.exit(f"error: {started} of {len(workers)} workers started gRPC within {timeout_s:.0f} s (log: {log_path})")


def grpc_request(model: str, photo: bytes):
    """ModelInfer for one encoded image, as tritonclient.grpc sends a BYTES element: its 4-byte little-endian
    length, then its bytes, in raw_input_contents."""
    from tuneserve.service.edges.oip_proto import grpc_service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    return pb.ModelInferRequest(model_name=model, inputs=[tensor],
                                raw_input_contents=[struct.pack("<I", len(photo)) + photo])


def check_agreement(url: str, model: str, body: bytes, headers: dict[str, str], target: str, request) -> float:
    """The largest difference between REST's and gRPC's probabilities for the photo; exits when it is over
    AGREEMENT_TOL or either answer fails."""
    import grpc

    from tuneserve.service.edges.oip_proto import grpc_service_pb2_grpc as pb_grpc

    r = httpx.post(f"{url}/v2/models/{model}/infer", content=body, timeout=60,
                   headers={**headers, "Content-Type": "application/octet-stream"})
    if r.status_code != 200:
        sys.exit(f"error: REST infer answered {r.status_code}: {r.text[:300]}")
    header_len = int(r.headers["Inference-Header-Content-Length"])
    size = json.loads(r.content[:header_len])["outputs"][0]["parameters"]["binary_data_size"]
    rest_probs = np.frombuffer(r.content[header_len:header_len + size], dtype="<f4")
    with grpc.insecure_channel(target) as channel:
        try:
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        except grpc.RpcError as e:
            sys.exit(f"error: gRPC ModelInfer answered {e.code().name}: {e.details()}")
    grpc_probs = np.frombuffer(answer.raw_output_contents[0], dtype="<f4")
    if rest_probs.shape != grpc_probs.shape:
        sys.exit(f"error: REST answered {rest_probs.size} probabilities, gRPC {grpc_probs.size}")
    diff = float(np.abs(rest_probs - grpc_probs).max())
    if diff > AGREEMENT_TOL:
        sys.exit(f"error: REST's and gRPC's probabilities differ by up to {diff:.3g} (> {AGREEMENT_TOL:g})")
    return diff


def rest_load(url: str, model: str, body_path: Path, headers: dict[str, str], connections: int, seconds: float,
              out: Path) -> dict:
    """One wrk run on /v2 infer: 200s per second, their p50/p99, the other answers, and wrk's CPU seconds per
    second (this process's reaped children: wrk is the only one it waits for meanwhile)."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    r = goodput.wrk(url, body_path, connections, seconds, out, path=f"/v2/models/{model}/infer",
                    content_type="application/octet-stream", headers=headers)
    cpu = _cpu_per_s(before, resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - started)
    errors = sum(v for k, v in r["statuses"].items() if k != "200") + sum(r["socket_errors"].values())
    return {"img_per_s": r["ok_per_s"], "p50_ms": r["ok_p50_ms"], "p99_ms": r["ok_p99_ms"], "errors": errors,
            "statuses": r["statuses"], "socket_errors": r["socket_errors"], "client_cpu_per_s": cpu}


def grpc_load(target: str, request, concurrency: int, seconds: float, tasks_per_channel: int, workers: list,
              grpc_port: int) -> dict:
    """`concurrency` closed-loop tasks sending `request` by ModelInfer for `seconds`: OK answers per second,
    their p50/p99, the other status codes, this process's CPU seconds per second, and how the channels'
    connections spread over the workers."""
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    ok_ms, statuses, spread = asyncio.run(
        _grpc_closed_loop(target, request, concurrency, seconds, tasks_per_channel,
                          lambda: connections_per_worker(workers, grpc_port)))
    cpu = _cpu_per_s(before, resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started)
    return {"img_per_s": round(len(ok_ms) / seconds, 1), "p50_ms": _r(goodput.percentile(ok_ms, 50)),
            "p99_ms": _r(goodput.percentile(ok_ms, 99)), "errors": sum(v for k, v in statuses.items() if k != "OK"),
            "statuses": statuses, "connections_per_worker": spread, "client_cpu_per_s": cpu}


async def _grpc_closed_loop(target: str, request, concurrency: int, seconds: float, tasks_per_channel: int,
                            spread) -> tuple[list[float], dict[str, int], list[int]]:
    import grpc

    from tuneserve.service.edges.oip_proto import grpc_service_pb2_grpc as pb_grpc

    # A local subchannel pool per channel: otherwise channels to one target share one connection, and the
    # kernel would hand all the load to one worker.
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(math.ceil(concurrency / tasks_per_channel))]
    ok_ms: list[float] = []
    statuses: dict[str, int] = {}
    try:
        # Connected before the clock starts (wrk connects within its run: a millisecond of 15 s).
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), CALL_TIMEOUT_S)
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        end = time.monotonic() + seconds

        async def client(stub) -> None:
            while (sent := time.monotonic()) < end:
                try:
                    await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                answered = time.monotonic()
                if answered > end:  # after the measured window: not counted, as wrk counts none
                    return
                statuses[code] = statuses.get(code, 0) + 1
                if code == "OK":
                    ok_ms.append(1000 * (answered - sent))

        await asyncio.gather(*(client(stubs[i % len(stubs)]) for i in range(concurrency)))
        where = spread()
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return ok_ms, statuses, where


def connections_per_worker(workers: list, port: int) -> list[int]:
    """Established connections on `port` held by each worker (the kernel's SO_REUSEPORT spread)."""
    return [sum(c.status == "ESTABLISHED" and c.laddr.port == port for c in w.net_connections("tcp"))
            for w in workers]


def _cpu_per_s(before, after, wall_s: float) -> float:
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return round(used / wall_s, 2)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def summarise(runs: list[dict]) -> list[dict]:
    """Per (protocol, concurrency): the medians over rounds, and every round's errors added up."""
    out = []
    for level in dict.fromkeys(r["concurrency"] for r in runs):
        for protocol in PROTOCOLS:
            rs = [r for r in runs if r["protocol"] == protocol and r["concurrency"] == level]
            out.append({"protocol": protocol, "concurrency": level, "errors": sum(r["errors"] for r in rs),
                        **{k: _median(r[k] for r in rs) for k in ("img_per_s", "p50_ms", "p99_ms", "client_cpu_per_s")}})
    return out


def _median(values) -> float | None:
    values = [v for v in values if v is not None]  # a run without one OK answer has no latency
    return round(statistics.median(values), 2) if values else None


def print_table(summary: list[dict], rounds: int) -> None:
    print(f"\n{'protocol':<9} {'conc':>5} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'client CPU':>10}"
          f"   (medians of {rounds}; client CPU in cores: wrk for REST, the Python generator for gRPC)")
    for s in summary:
        print(f"{s['protocol']:<9} {s['concurrency']:>5} {s['img_per_s']!s:>7} {s['p50_ms']!s:>7} "
              f"{s['p99_ms']!s:>7} {s['errors']:>6} {s['client_cpu_per_s']!s:>10}")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("bentoml", "grpcio", "protobuf", "onnxruntime", "onnxruntime-gpu", "numpy", "pillow"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    r = subprocess.run(["wrk", "-v"], capture_output=True, text=True)  # prints its version, exits 1
    out["wrk"] = (r.stdout or r.stderr).split("\n", 1)[0].strip() or None
    return out


if __name__ == "__main__":
    main()

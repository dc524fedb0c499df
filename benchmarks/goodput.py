"""Goodput under a closed-loop flood: 200-answers per second, their p99, and /readyz's answer time, at 16, 64,
256 and 1,024 connections that resend the moment they are answered, for tuneserve (defaults) and LitServe given
tuneserve's preprocessing, interleaved level by level in one run.

    bash benchmarks/peers/setup.sh                       # once: LitServe in benchmarks/peers/.venv
    apt-get install wrk                                  # the load: wrk, one connection per thread
    .venv/bin/python benchmarks/goodput.py --out benchmarks/results/goodput.json
    .venv/bin/python benchmarks/goodput.py --levels 16,64 --seconds 5 --servers tuneserve   # smoke run

The load is wrk (C, a fraction of a core) with benchmarks/wrk/goodput.lua, which times each request itself so
the 200s' latency is kept apart from the 503s'; a Python generator would share the 2 cores with the server it
measures. Every server runs for the whole benchmark and the levels alternate between them, so a drift of the
machine shows in all; while one is measured the others are stopped (SIGSTOP to their process groups), because
an idle server is not idle for all: LitServe's processes poll their queues, 2.4 s of CPU in 10 idle seconds on
2 cores (tuneserve's: 0.05 s), which the measured server would lose. Every request is the same photo (a
hymenoptera validation JPEG, or a generated one without ../shared) as multipart field `image`, the upload
format both serve. Meanwhile a thread asks tuneserve's /readyz every 100 ms and keeps the slowest answer.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import compare  # noqa: E402  (benchmarks/peers/compare.py: the servers, as the peers benchmark starts them)
import loadgen  # noqa: E402
from results_io import write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
LUA = HERE / "wrk" / "goodput.lua"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class ReadyProbe:
    """GET url every `every_s` in a thread; the slowest answer (ms) and how many were not 200."""

    def __init__(self, url: str, every_s: float = 0.1):
        self.url, self.every_s = url, every_s
        self.times: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.times.append(1000 * (time.monotonic() - started))
                self.failed += not ok
                self._stop.wait(self.every_s)

    def __enter__(self) -> "ReadyProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wrk(url: str, body: Path, connections: int, seconds: float, out: Path, path: str = "/classify",
        content_type: str = compare.CONTENT_TYPE, headers: dict[str, str] | None = None) -> dict:
    """One wrk run POSTing `body` to url + `path` (with `headers` besides Content-Type); the Lua script's
    per-status counts and 200 latencies, summarised."""
    env = {**os.environ, "GOODPUT_BODY": str(body), "GOODPUT_CONTENT_TYPE": content_type, "GOODPUT_OUT": str(out)}
    if headers:  # the Lua script splits them on "|"
        bad = [f"{k}: {v}" for k, v in headers.items() if "|" in k + v or ":" in k]
        if bad:
            raise ValueError(f"wrk headers cannot hold '|' (or ':' in a name), got {bad}")
        env["GOODPUT_HEADERS"] = "|".join(f"{k}: {v}" for k, v in headers.items())
    cmd = ["wrk", "-t", str(connections), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "30s",
           "-s", str(LUA), f"{url}{path}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, reaped: its CPU is in the children's total now
    load_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    raw = json.loads(out.read_text())
    statuses: dict[str, int] = {}
    ok: list[float] = []
    for t in raw["threads"]:
        for k, v in t["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        ok += t["ok_ms"]
    duration = raw["duration_us"] / 1e6
    return {"ok_per_s": round(len(ok) / duration, 1), "ok_p50_ms": _r(percentile(ok, 50)),
            "ok_p99_ms": _r(percentile(ok, 99)), "answers_per_s": round(sum(statuses.values()) / duration, 1),
            "statuses": statuses, "socket_errors": raw["socket_errors"], "seconds": round(duration, 1),
            # the load generator's own share of the machine's CPUs (over the whole wrk run, warm-up of none)
            "load_cpu_share": round(load_cpu_s / (duration * (os.cpu_count() or 1)), 3)}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="16,64,256,1024", help="closed-loop connections, comma-separated")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per (server, level)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each measurement")
    ap.add_argument("--servers", default="tuneserve,litserve-same-pre",
                    help="any of tuneserve, tuneserve-before (needs --before-dir), litserve-same-pre")
    ap.add_argument("--before-dir", type=Path, default=None,
                    help="an older checkout (git worktree) served as tuneserve-before, for before/after in one run")
    add_load_arguments(ap)
    args = ap.parse_args()
    require_wrk()
    levels = [int(x) for x in args.levels.split(",")]
    servers = args.servers.split(",")
    unknown = set(servers) - {"tuneserve", "tuneserve-before", "litserve-same-pre"}
    if unknown:
        sys.exit(f"error: --servers takes tuneserve, tuneserve-before and litserve-same-pre, got {sorted(unknown)}")
    if "tuneserve-before" in servers and not (args.before_dir and (args.before_dir / "service").is_dir()):
        sys.exit("error: tuneserve-before needs --before-dir, an older checkout of this repository (git worktree add)")
    if "litserve-same-pre" in servers and not compare.peers_venv_has("litserve"):
        sys.exit(f"error: {compare.PEERS_PYTHON} has no litserve: run  bash benchmarks/peers/setup.sh  first")
    photo = args.photo.read_bytes() if args.photo else compare_photo()
    work = Path(tempfile.mkdtemp(prefix="tuneserve-goodput-"))
    body = work / "body.bin"
    body.write_bytes(compare.multipart(photo))
    runs: list[dict] = []
    model = builtin_model(args.bentoml_home or work / "bentoml")
    spec = work / "model-spec.json"
    spec.write_text(json.dumps({"onnx": str(model.onnx_path), "labels": model.card.labels,
                                "preprocessing": model.card.preprocessing.to_dict()}))
    env = {"PEERS_MODEL_SPEC": str(spec)}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name in servers:
            if name == "tuneserve-before":  # the older checkout's own service, as benchmarks/loadgen.py serves one
                home = register_builtin(args.before_dir, work / "bentoml-before")
                urls[name] = stack.enter_context(loadgen.serve(args.before_dir, {"BENTOML_HOME": str(home)}))[0]
                compare.wait_answering(urls[name], body.read_bytes(), None, None, compare.READY_TIMEOUT_S)
            else:
                urls[name] = stack.enter_context(compare.server(name, env, body.read_bytes(), work, {}))
        groups = {name: process_group(url) for name, url in urls.items()}
        for level in levels:
            for name in servers:
                url = urls[name]
                with only_running(name, groups):
                    if args.warmup > 0:
                        wrk(url, body, level, args.warmup, work / "warmup.json")
                    probe_url = f"{url}/health" if name == "litserve-same-pre" else f"{url}/readyz"
                    with ReadyProbe(probe_url) as probe:
                        result = wrk(url, body, level, args.seconds, work / "run.json")
                runs.append({"server": name, "connections": level, **result,
                             "ready_max_ms": _r(max(probe.times, default=None)),
                             "ready_p99_ms": _r(percentile(probe.times, 99)), "ready_failed": probe.failed})
                print(json.dumps(runs[-1]), flush=True)
    print_table(runs, levels, servers)
    if args.out:
        write_result(args.out, levels=levels, seconds=args.seconds, warmup=args.warmup, runs=runs,
                     versions=compare.versions())


def process_group(url: str) -> int:
    """The process group of the server listening on `url`'s port (each server is started in its own session,
    its worker processes with it)."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return os.getpgid(c.pid)
    raise RuntimeError(f"no process listens on port {port} ({url})")


@contextlib.contextmanager
def only_running(measured: str, groups: dict[str, int]):
    """Every server but `measured` stopped (SIGSTOP) for the block, continued (SIGCONT) after it."""
    others = [group for name, group in groups.items() if name != measured]
    for group in others:
        os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        for group in others:
            os.killpg(group, signal.SIGCONT)


def add_load_arguments(ap: argparse.ArgumentParser) -> None:
    """--photo, --bentoml-home and --out, as the wrk-driven benchmarks (this one, protocols_load.py) take them."""
    ap.add_argument("--photo", type=Path, default=None, help="the JPEG every request sends (default: a hymenoptera "
                    "validation photo, or a generated 500x375 JPEG without ../shared)")
    ap.add_argument("--bentoml-home", type=Path, default=None, help="model store holding (or to get) the built-in "
                    "model; default: a temporary one (~20 s to export it)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (benchmarks/results_io.py)")


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (Debian: apt-get install wrk)")


def builtin_model(home: Path):
    """The built-in model, registered (once) in the model store at `home`, which this process then uses."""
    os.environ["BENTOML_HOME"] = str(home)
    from tuneserve.training.builtin import ensure_builtin_model

    return ensure_builtin_model()


def register_builtin(checkout: Path, home: Path) -> Path:
    """A model store with the built-in model as `checkout`'s own code exports it (its card and graph are that
    version's), for serving that checkout."""
    code = "from tuneserve.training.builtin import ensure_builtin_model; ensure_builtin_model()"
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(checkout.resolve())}
    subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, check=True, capture_output=True, timeout=600)
    return home


def compare_photo() -> bytes:
    from shared_data import HYMENOPTERA

    photos = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))
    if photos:
        return photos[0].read_bytes()
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def print_table(runs: list[dict], levels: list[int], servers: list[str]) -> None:
    """One row per (server, level): 200s per second, as a share of the server's own at the first level, their
    p50/p99, refusals per second, the slowest /readyz, and the ratio to LitServe at the same level."""
    print(f"\n{'server':<18} {'conns':>6} {'200/s':>7} {'x cap':>6} {'200 p50':>8} {'200 p99':>8} {'503/s':>7} "
          f"{'ready max':>9} {'wrk cpu':>7}  vs litserve")
    for r in runs:
        base = next((o["ok_per_s"] for o in runs if o["server"] == r["server"] and o["connections"] == levels[0]), None)
        lit = next((o for o in runs if o["server"] == "litserve-same-pre" and o["connections"] == r["connections"]), None)
        ratio = f"{r['ok_per_s'] / lit['ok_per_s']:.2f}x" if lit and lit["ok_per_s"] and r is not lit else ""
        refused = r["statuses"].get("503", 0) / r["seconds"]
        cap = f"{r['ok_per_s'] / base:.2f}" if base else ""
        print(f"{r['server']:<18} {r['connections']:>6} {r['ok_per_s']:>7} {cap:>6} {r['ok_p50_ms']!s:>8} "
              f"{r['ok_p99_ms']!s:>8} {refused:>7.1f} {r['ready_max_ms']!s:>9} {r.get('load_cpu_share', '')!s:>7}  {ratio}")


if __name__ == "__main__":
    main()

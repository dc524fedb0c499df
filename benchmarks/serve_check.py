"""Several closed-loop loads against one running service: start it once, run `serve_load.py --url` for each
(images per request, connections) pair, stop it.

    python3 benchmarks/serve_check.py --model gpu-check-resnet50 --images PHOTOS/val --loads 1x256,16x256,1x64,16x64 \\
        --outdir OUT -- --duration 20 --warmup 5 --processes 4 --engine-seconds 1

One start instead of one per load: on a GPU each start loads the model into every worker and runs cuDNN's
algorithm search per batch shape, which costs more than a short load. Each load is its own serve_load.py
process under its own timeout (--load-timeout); a load that fails or times out is recorded in the JSON
(serve-check.json) and the next one still runs. Its results are serve_load's own JSON, OUTDIR/serve-bNcC.json.
Flags after `--` go to every serve_load.py call.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from results_io import write_result

HERE = Path(__file__).resolve().parent


def parse_loads(text: str) -> list[tuple[int, int]]:
    """"1x256,16x64" -> [(1, 256), (16, 64)]: (images per request, closed-loop connections)."""
    loads = []
    for item in text.split(","):
        n, sep, c = item.partition("x")
        if not sep or not n.isdigit() or not c.isdigit() or int(n) < 1 or int(c) < 1:
            raise SystemExit(f"error: --loads takes IMAGESxCONNECTIONS pairs such as 1x256,16x64; got {item!r}")
        loads.append((int(n), int(c)))
    return loads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--loads", default="1x256,16x256,1x64,16x64")
    ap.add_argument("--outdir", type=Path, required=True)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="service setting (repeatable)")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for the service to become ready")
    ap.add_argument("--load-timeout", type=float, default=120.0, help="seconds per serve_load.py run")
    ap.add_argument("load_args", nargs=argparse.REMAINDER, help="after --: flags for every serve_load.py run")
    args = ap.parse_args()
    loads = parse_loads(args.loads)
    extra = [a for a in args.load_args if a != "--"]
    env = {"TUNESERVE_MODEL": args.model}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --env takes NAME=VALUE, got {item!r}")
        env[name] = value

    from tuneserve.service.process import running_server

    # `timeout` stops this process with SIGTERM: exit through the server's context manager, which stops the
    # service (its own session, out of the reach of the signal sent to our process group).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    args.outdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    t0 = time.perf_counter()
    started = None
    try:
        with running_server(env=env, ready_timeout_s=args.ready_timeout, log_path=args.outdir / "serve-server.log") as url:
            started = time.perf_counter() - t0
            print(f"service ready at {url} after {started:.0f} s", flush=True)
            run_loads(url, loads, args, extra, runs)
    except Exception as e:  # noqa: BLE001 - the service did not start or died: recorded, and the check goes on
        error = f"{type(e).__name__}: {e}"[-3000:]
    else:
        error = None
    write_result(args.outdir / "serve-check.json", model=args.model, startup_s=started and round(started, 1), runs=runs,
                 service_env=env, error=error)
    if error:
        print(error, file=sys.stderr)
    sys.exit(0 if not error and all(r["returncode"] == 0 for r in runs) else 1)


def run_loads(url: str, loads: list[tuple[int, int]], args: argparse.Namespace, extra: list[str],
              runs: list[dict]) -> None:
    """Each load as its own serve_load.py process, appended to `runs` as it ends."""
    for n, c in loads:
        out = args.outdir / f"serve-b{n}c{c}.json"
        cmd = [sys.executable, str(HERE / "serve_load.py"), "--url", url, "--images", str(args.images),
               "--concurrency", str(c), "--batch-images", str(n), "--label", f"{n} image(s) x {c} connections",
               "--out", str(out), *extra]
        t1 = time.perf_counter()
        try:
            rc: int | str = subprocess.run(cmd, timeout=args.load_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        runs.append({"images_per_request": n, "connections": c, "returncode": rc,
                     "result": out.name if out.exists() else None, "seconds": round(time.perf_counter() - t1, 1)})
        print(f"load {n}x{c}: {'done' if rc == 0 else f'failed ({rc})'}", flush=True)


if __name__ == "__main__":
    main()

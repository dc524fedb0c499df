"""tuneserve against the serving frameworks a user would pick instead, same ONNX model, same machine.

    bash benchmarks/peers/setup.sh                      # once: the peers' venv (LitServe, Ray Serve)
    .venv/bin/python benchmarks/peers/compare.py --out benchmarks/results/peers.json
    .venv/bin/python benchmarks/peers/compare.py --seconds 2 --rounds 1 --clients 1,16    # smoke run

Servers (benchmarks/peers/README.md says how each is configured and why):
  tuneserve           `bentoml serve` of tuneserve's service with its defaults (loadgen.serve)
  litserve            LitServe as its docs write it, straightforward PIL preprocessing (litserve_server.py)
  litserve-same-pre   LitServe given tuneserve's preprocessing and onnxruntime CPU threads (litserve_same_pre.py)
  bentoml-gallery     a plain BentoML service as BentoML's docs/examples write it (bentoml_gallery.py)
  ray-serve           Ray Serve with @serve.batch (ray_serve.py); skipped when Ray is not in the peers' venv

Every server runs the built-in model's fp32 model.onnx (registered in a temporary BENTOML_HOME, as
host_cost.py does) and answers POST /classify, multipart field `image`, with the top-5 labels and softmax
scores. Each gets the same request bytes.

1. Agreement: --agree photos (hymenoptera val, evenly spread) sent to every server; top-1 label and scores
   compared with tuneserve's (reported as measured, disagreement included).
2. Load: closed loop (loadgen.closed_loop: each client sends its next request when the previous one is
   answered), every --clients count for --seconds after --warmup seconds unmeasured, one server at a time,
   --rounds rounds with the server order rotated each round (this machine's speed drifts by several percent).
   Reported per (server, clients): images/s, p50 and p99 latency of the answered requests, errors; medians over
   the rounds, and tuneserve's images/s over each peer's.
Each server process tree is killed when its turn ends, also on Ctrl-C or an error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

PEERS_DIR = Path(__file__).resolve().parent
ROOT = PEERS_DIR.parents[1]
sys.path.insert(0, str(PEERS_DIR.parent))  # benchmarks/: loadgen, results_io, shared_data

import loadgen  # noqa: E402
from results_io import write_result  # noqa: E402
from shared_data import HYMENOPTERA  # noqa: E402

PEERS_PYTHON = PEERS_DIR / ".venv" / "bin" / "python"
SERVERS = ("tuneserve", "litserve", "litserve-same-pre", "bentoml-gallery", "ray-serve")
BOUNDARY = "tuneservepeersboundary7f3a"
READY_TIMEOUT_S = 240.0


def multipart(image: bytes, name: str = "photo.jpg") -> bytes:
    """One image as multipart/form-data field `image`: the request format every server here documents for a
    file upload (tuneserve's /classify, LitServe's and Ray's starlette form, BentoML's PIL.Image parameter)."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


# -- starting and stopping servers --------------------------------------------------------------------------

def _session_pids(sid: int) -> list[int]:
    """Every process in session `sid`: a server started in its own session and everything it started (Ray's
    actors have their own process groups but stay in the session)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except OSError:
                pass  # gone meanwhile
    return out


def stop_session(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the server's main process (each framework shuts its workers down on it), then its process
    group, then SIGKILL whatever is left in its session."""
    sid = proc.pid
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
    deadline = time.monotonic() + 5.0
    while (left := _session_pids(sid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_answering(url: str, body: bytes, proc: subprocess.Popen | None, log: Path | None, timeout_s: float) -> None:
    """Until POST /classify with one image answers 200 (the model loaded in every worker it routes to)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before answering:\n{_log_tail(log)}")
            try:
                r = client.post(f"{url}/classify", content=body, headers={"Content-Type": CONTENT_TYPE})
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.TransportError as e:
                last = type(e).__name__
            time.sleep(0.5)
    tail = _log_tail(log) if log else ""
    raise RuntimeError(f"server at {url} did not answer within {timeout_s:.0f} s ({last}):\n{tail}")


@contextlib.contextmanager
def peer_server(name: str, env: dict[str, str], probe: bytes, log_dir: Path) -> Iterator[str]:
    from tuneserve.service.process import free_port

    port = free_port()
    if name == "bentoml-gallery":
        command = [sys.executable, "-m", "bentoml", "serve", "bentoml_gallery:ImageClassifier", "--host", "127.0.0.1",
                   "--port", str(port), "--working-dir", str(PEERS_DIR)]
    else:
        script = {"litserve": "litserve_server.py", "litserve-same-pre": "litserve_same_pre.py",
                  "ray-serve": "ray_serve.py"}[name]
        command = [str(PEERS_PYTHON), str(PEERS_DIR / script), "--host", "127.0.0.1", "--port", str(port)]
    log = log_dir / f"{name}.log"
    if name == "litserve-same-pre":  # tuneserve's preprocessing, imported from the source tree
        env = {**env, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        # Own session: Ctrl-C in a terminal reaches us, not the server, and stop_session finds all its processes.
        proc = subprocess.Popen(command, cwd=PEERS_DIR, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_answering(url, probe, proc, log, READY_TIMEOUT_S)
        yield url
    finally:
        stop_session(proc)


@contextlib.contextmanager
def server(name: str, env: dict[str, str], probe: bytes, log_dir: Path, tuneserve_env: dict[str, str]) -> Iterator[str]:
    if name == "tuneserve":
        with loadgen.serve(None, tuneserve_env) as (url, _):  # by default nothing set: tuneserve's defaults
            wait_answering(url, probe, None, None, READY_TIMEOUT_S)
            yield url
    else:
        with peer_server(name, env, probe, log_dir) as url:
            yield url


# -- measurements --------------------------------------------------------------------------------------------

def answers(url: str, bodies: list[bytes]) -> list[dict]:
    """Each photo's predictions [{label, score}] (BentoML's batchable API answers a list: its first item)."""
    out = []
    with httpx.Client(timeout=60) as client:
        for b in bodies:
            r = client.post(f"{url}/classify", content=b, headers={"Content-Type": CONTENT_TYPE})
            r.raise_for_status()
            a = r.json()
            out.append((a[0] if isinstance(a, list) else a)["predictions"])
    return out


def agreement(ref: list[list[dict]], got: list[list[dict]], tol: float) -> dict:
    """Top-1 label agreement and the largest score difference over the labels both top-5s hold."""
    same_top1, within, diffs = 0, 0, []
    for r, g in zip(ref, got):
        same_top1 += r[0]["label"] == g[0]["label"]
        gs = {p["label"]: p["score"] for p in g}
        d = max((abs(p["score"] - gs[p["label"]]) for p in r if p["label"] in gs), default=float("inf"))
        diffs.append(d)
        within += d <= tol
    return {"photos": len(ref), "top1_agree": same_top1, "scores_within_tol": within, "tol": tol,
            "max_score_diff": max(diffs) if diffs else None,
            "median_score_diff": statistics.median(diffs) if diffs else None}


def load(url: str, requests: list[bytes], clients: int, seconds: float, warmup: float) -> dict:
    if warmup > 0:
        loadgen.run(loadgen.closed_loop(url, requests, clients, warmup))
    records = loadgen.run(loadgen.closed_loop(url, requests, clients, seconds))
    ok = [r.latency for r in records if r.status == 200]
    errors: dict[str, int] = {}
    for r in records:
        if r.status != 200:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    return {"images_per_s": round(len(ok) / seconds, 1), "p50_ms": _ms(loadgen.percentile(ok, 50)),
            "p99_ms": _ms(loadgen.percentile(ok, 99)), "requests": len(records),
            "errors": sum(errors.values()), "errors_by_status": errors}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


# -- setup and report ----------------------------------------------------------------------------------------

def peers_venv_has(module: str) -> bool:
    if not PEERS_PYTHON.exists():
        return False
    return subprocess.run([str(PEERS_PYTHON), "-c", f"import {module}"], capture_output=True).returncode == 0


def versions() -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json\n"
            "def v(p):\n    try: return m.version(p)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({p: v(p) for p in %r}))")
    out = {}
    for python, pkgs in ((sys.executable, ("bentoml", "onnxruntime-gpu", "pillow", "numpy")),
                         (str(PEERS_PYTHON), ("litserve", "ray", "onnxruntime-gpu", "pillow", "numpy"))):
        if Path(python).exists():
            r = subprocess.run([python, "-c", code % (pkgs,)], capture_output=True, text=True)
            if r.returncode == 0:
                venv = "project" if python == sys.executable else "peers"
                out.update({f"{p} ({venv})": ver for p, ver in json.loads(r.stdout).items()})
    return out


def summarise(runs: list[dict], names: list[str], clients: list[int]) -> tuple[list[dict], list[dict]]:
    """Medians over the rounds per (server, clients), errors added up; tuneserve's images/s over each peer's."""
    summary, ratios = [], []
    for c in clients:
        by_name = {}
        for name in names:
            rs = [r for r in runs if r["server"] == name and r["clients"] == c]
            if not rs:
                continue
            errors: dict[str, int] = {}
            for r in rs:
                for status, n in r["errors_by_status"].items():
                    errors[status] = errors.get(status, 0) + n
            row = {"server": name, "clients": c, "rounds": len(rs),
                   **{k: _median([r[k] for r in rs]) for k in ("images_per_s", "p50_ms", "p99_ms")},
                   "errors": sum(errors.values()), "errors_by_status": errors}
            summary.append(row)
            by_name[name] = row
        ts = by_name.get("tuneserve")
        for name, row in by_name.items():
            if name != "tuneserve" and ts and ts["images_per_s"] and row["images_per_s"]:
                ratios.append({"peer": name, "clients": c,
                               "tuneserve_over_peer_images_per_s": round(ts["images_per_s"] / row["images_per_s"], 2)})
    return summary, ratios


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def print_report(summary: list[dict], ratios: list[dict], agree: dict, rounds: int, seconds: float) -> None:
    if agree:
        print(f"\nagreement with tuneserve ({next(iter(agree.values()))['photos']} photos):")
    for name, a in agree.items():
        print(f"  {name:18s} top-1 {a['top1_agree']}/{a['photos']}, scores within {a['tol']:g}: "
              f"{a['scores_within_tol']}/{a['photos']}, max diff {a['max_score_diff']:.2e}, "
              f"median {a['median_score_diff']:.2e}")
    ratio = {(r["peer"], r["clients"]): r["tuneserve_over_peer_images_per_s"] for r in ratios}
    print(f"\n{'server':18s} {'clients':>7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>12} "
          f"{'tuneserve/peer':>15}   (medians of {rounds} round(s) x {seconds:g} s; latency of answered requests)")
    for s in summary:
        r = ratio.get((s["server"], s["clients"]))
        errors = " ".join(f"{n}x{st}" for st, n in sorted(s["errors_by_status"].items())) or "0"
        print(f"{s['server']:18s} {s['clients']:>7} {_f(s['images_per_s']):>8} {_f(s['p50_ms']):>8} "
              f"{_f(s['p99_ms']):>8} {errors:>12} {'' if r is None else f'{r:.2f}x':>15}")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per (server, clients, round)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds of the same load before each")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="1,16,64", help="closed-loop client counts, comma-separated")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    ap.add_argument("--images", type=Path, default=HYMENOPTERA / "val", help="JPEGs to send (default: hymenoptera val)")
    ap.add_argument("--agree", type=int, default=20, help="photos for the agreement check")
    ap.add_argument("--tol", type=float, default=1e-3, help="score difference counted as agreeing")
    ap.add_argument("--bentoml-home", type=Path, default=None,
                    help="model store holding (or to get) the built-in model; default: a temporary one")
    ap.add_argument("--tuneserve-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a tuneserve setting instead of its default (repeatable), e.g. TUNESERVE_MAX_LATENCY_MS=30000")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    tuneserve_env = loadgen.server_env(args.tuneserve_env)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every server's finally-block stops it; SIGINT gets
    # Python's handler even where the shell started us ignoring it (a background job).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    clients = [int(c) for c in args.clients.split(",")]
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = set(names) - set(SERVERS)
    if unknown or "tuneserve" not in names:
        ap.error(f"--servers takes tuneserve (always) and any of {', '.join(SERVERS[1:])}; got {args.servers!r}")
    skipped = {}
    if any(n in names for n in ("litserve", "litserve-same-pre", "ray-serve")) and not peers_venv_has("litserve"):
        sys.exit(f"error: {PEERS_PYTHON} has no litserve: run  bash benchmarks/peers/setup.sh  first")
    if "ray-serve" in names and not peers_venv_has("ray.serve"):
        skipped["ray-serve"] = "ray[serve] is not installed in the peers' venv (setup.sh with PEERS_RAY=1)"
        names.remove("ray-serve")

    bodies = loadgen.photo_bodies(args.images)
    step = max(1, len(bodies) // max(1, args.agree))
    agree_bodies = [multipart(b) for b in bodies[::step][:args.agree]]
    load_bodies = [multipart(b) for b in bodies]

    with contextlib.ExitStack() as stack:
        home = args.bentoml_home or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tuneserve-peers-")))
        os.environ["BENTOML_HOME"] = str(home)
        os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
        from tuneserve.training.builtin import ensure_builtin_model

        model = ensure_builtin_model()
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tuneserve-peers-work-")))  # spec, logs
        spec_path = work / "model-spec.json"
        spec_path.write_text(json.dumps({"onnx": str(model.onnx_path), "labels": model.card.labels,
                                         "preprocessing": model.card.preprocessing.to_dict()}))
        peer_env = {"PEERS_MODEL_SPEC": str(spec_path)}
        print(f"model {model.tag} ({model.onnx_path}); servers: {', '.join(names)}"
              + "".join(f"; skipped {k}: {v}" for k, v in skipped.items()), flush=True)

        runs: list[dict] = []
        preds: dict[str, list] = {}
        failed: dict[str, str] = {}
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in (n for n in order if n not in failed):
                started = time.monotonic()
                try:
                    with server(name, peer_env, agree_bodies[0], work, tuneserve_env) as url:
                        ready_s = round(time.monotonic() - started, 1)
                        if name not in preds:
                            preds[name] = answers(url, agree_bodies)
                        for c in clients:
                            requests = loadgen.build_requests(url, "/classify", load_bodies, content_type=CONTENT_TYPE)
                            runs.append({"server": name, "clients": c, "round": rnd, "ready_s": ready_s,
                                         **load(url, requests, c, args.seconds, args.warmup)})
                            print(runs[-1], flush=True)
                except (RuntimeError, httpx.HTTPError) as e:
                    if name == "tuneserve":
                        raise  # the reference: nothing to compare without it
                    # One peer that fails does not cost the others' measurements: reported, left out from here on.
                    failed[name] = f"{type(e).__name__}: {e}"
                    print(f"error: {name} failed, left out: {failed[name]}", file=sys.stderr, flush=True)

    agree = {n: agreement(preds["tuneserve"], preds[n], args.tol) for n in names if n in preds and n != "tuneserve"}
    summary, ratios = summarise(runs, names, clients)
    print_report(summary, ratios, agree, args.rounds, args.seconds)
    for name, why in failed.items():
        print(f"{name} FAILED (not in the table from then on): {why.splitlines()[0]}")
    if args.out:
        write_result(args.out, model=model.tag, servers=names, skipped=skipped, failed=failed, tuneserve_env=tuneserve_env,
                     seconds=args.seconds, warmup=args.warmup, rounds=args.rounds, clients=clients, versions=versions(),
                     request="POST /classify, multipart/form-data field 'image', one hymenoptera val JPEG",
                     agreement=agree, summary=summary, tuneserve_ratio=ratios, runs=runs)


if __name__ == "__main__":
    main()

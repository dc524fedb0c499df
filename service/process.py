"""Running the service as a child process: `bentoml serve` on a free port, ready-wait, clean stop.

Used by `tuneserve demo`, the end-to-end tests and `benchmarks/serve_load.py --start`. Client side only:
nothing here imports BentoML or the model.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import httpx

import tuneserve

log = logging.getLogger(__name__)

SERVICE = "tuneserve.service.service:Classifier"
# bentoml's working dir: the folder that holds the tuneserve package this process runs (a checkout, or
# site-packages), so that the workers import the same code, whatever the current directory holds.
PACKAGE_PARENT = Path(tuneserve.__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--working-dir", str(PACKAGE_PARENT)]


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message ends with the tail of its log."""


@contextlib.contextmanager
def running_server(
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready_timeout_s: float = 180.0,
    log_path: Path | None = None,
    command: Sequence[str] | None = None,
) -> Iterator[str]:
    """Start the service with `env` added to this process's environment; yield its URL once /readyz says
    200; stop it (its whole process group) on exit. Its output goes to `log_path` (a temp file if None).
    `command` replaces `bentoml serve ...` (e.g. `tuneserve serve ...`); it must listen on host:port."""
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    # No gRPC unless asked: servers started here run beside others (tests, benchmarks), and a second server
    # on one gRPC port is refused (service/edges/grpc_edge.py).
    env = {"TUNESERVE_GRPC_PORT": os.environ.get("TUNESERVE_GRPC_PORT", "0"), **(env or {})}
    temporary_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="tuneserve-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with open(log_path, "wb") as out:
        # Own session: stopping it reaches bentoml's worker processes too, and Ctrl-C in a terminal
        # goes to us first, so the finally-block below decides how the server stops.
        proc = subprocess.Popen(list(command or serve_command(host, port)), env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, url, ready_timeout_s, log_path)
        log.info("service ready at %s (pid %d, log %s)", url, proc.pid, log_path)
        yield url
    finally:
        stop(proc)
        if temporary_log:
            log_path.unlink(missing_ok=True)  # a failure's tail is already in the ServerFailed message


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerFailed(f"the server exited with code {proc.returncode} before it was ready:\n"
                                   f"{log_tail(log_path)}")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.3)
    raise ServerFailed(f"the server was not ready after {timeout_s:.0f} s:\n{log_tail(log_path)}")


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group (bentoml shuts its workers down), SIGKILL it after `grace_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("server pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"

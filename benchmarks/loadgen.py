"""A lean HTTP/1.1 load generator for the overload and soak benchmarks: raw asyncio streams (uvloop when
installed) and pre-built requests, so that one process can offer several times what the service answers on
the same machine (an httpx client saturates its core first).

Open loop (`rate`): request i is due at start + i / rate whatever happened to the others, and its latency
counts from that moment, so a slow server shows as latency instead of slowing the offered load (no
coordinated omission). Closed loop (`clients`): each client sends, waits for the answer, sends again.
Every request is recorded as (due, latency, status), seconds from the phase's start.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Record:
    due: float  # seconds after the phase started when the request was due (open loop) or sent (closed)
    latency: float  # seconds from due to the whole answer; inf when the connection failed
    status: int  # HTTP status; 0 for a failed connection


def add_server_arguments(ap) -> None:
    """--images, --env and --server-dir, as the overload, soak, worker-kill and several-models benchmarks take them."""
    from pathlib import Path

    from shared_data import HYMENOPTERA

    ap.add_argument("--images", type=Path, default=HYMENOPTERA / "val", help="JPEGs to send (default: hymenoptera val)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server setting (repeatable)")
    ap.add_argument("--server-dir", type=Path, default=None,
                    help="serve this checkout instead of the installed code (an older commit in a git worktree)")


@contextlib.contextmanager
def serve(server_dir, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A fresh server on a free port, with `env` added to this environment: (url, port). `server_dir`: serve
    that checkout (as `bentoml serve`'s working directory and first on the path) instead of the code
    installed here; None: the installed code."""
    import sys

    from tuneserve.service.process import SERVICE, free_port, running_server

    port = free_port()
    command = None
    if server_dir is not None:
        root = server_dir.resolve()
        command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port),
                   "--working-dir", str(root)]
        env = {**env, "PYTHONPATH": str(root)}
    with running_server(env=env, port=port, command=command) as url:
        yield url, port


def server_process(port: int):
    """The psutil.Process of the `bentoml serve` listening on `port` (its workers are its children)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "bentoml" in cmd and f"--port {port}" in cmd and "_bentoml_impl.worker" not in cmd:
            return p
    raise RuntimeError(f"no bentoml serve process on port {port}")


def worker_processes(port: int) -> list:
    """The worker processes of the `bentoml serve` listening on `port`."""
    return [c for c in server_process(port).children(recursive=True) if "_bentoml_impl.worker" in " ".join(c.cmdline())]


def photo_bodies(folder) -> list[bytes]:
    """Every .jpg under `folder`, read; exits with a message when there is none."""
    import sys

    bodies = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))]
    if not bodies:
        sys.exit(f"error: no .jpg files under {folder}")
    return bodies


def server_env(pairs: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in pairs)


def build_requests(url: str, path: str, bodies: list[bytes], content_type: str = "application/octet-stream",
                   headers=None) -> list[bytes]:
    """Raw HTTP/1.1 requests. `headers`: extra headers, a dict or a function of the body (for headers that
    depend on it, such as the Open Inference Protocol's Inference-Header-Content-Length)."""
    host = urlsplit(url).netloc
    out = []
    for b in bodies:
        extra = "".join(f"{k}: {v}\r\n" for k, v in ((headers(b) if callable(headers) else headers) or {}).items())
        out.append((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(b)}\r\n{extra}\r\n").encode() + b)
    return out


def v2_binary_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol request for one encoded image in the binary tensor extension, as tritonclient
    sends it (output binary too): (body, headers)."""
    import json
    import struct

    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(image) + 4}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + struct.pack("<I", len(image)) + image, {"Inference-Header-Content-Length": str(len(header))}


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        """(status, keep-alive) for one request on this connection."""
        self.writer.write(request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length:
            await self.reader.readexactly(length)
        return status, not close

    def close(self) -> None:
        self.writer.close()


async def _open(pool: "_Pool"):
    return await asyncio.open_connection(pool.host, pool.port)


class _Pool:
    """Idle keep-alive connections, reused last-in first-out; new ones opened as needed."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[_Connection] = []

    async def get(self) -> _Connection:
        if self.idle:
            return self.idle.pop()
        return _Connection(*await asyncio.open_connection(self.host, self.port))

    def put(self, conn: _Connection, reusable: bool) -> None:
        if reusable:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for c in self.idle:
            c.close()
        self.idle.clear()


async def _send(pool: _Pool, request: bytes) -> int:
    """The answer's status; 0 when the connection failed. A kept-alive connection the server has closed
    meanwhile (its idle timeout) is retried once on a new one, as HTTP clients do."""
    for attempt in range(2):
        reused = bool(pool.idle) and attempt == 0
        conn = await pool.get() if attempt == 0 else _Connection(*await _open(pool))
        try:
            status, keep = await conn.exchange(request)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            conn.close()
            if reused:
                continue  # the server closed it while idle: once more, on a new connection
            return 0
        pool.put(conn, keep)
        return status
    return 0


async def open_loop(url: str, requests: list[bytes], rate: float, duration_s: float, seed: int = 0) -> list[Record]:
    """Offer `rate` requests/s for `duration_s`, each a random one of `requests`."""
    parts = urlsplit(url)
    pool = _Pool(parts.hostname, parts.port)
    rng = random.Random(seed)
    records: list[Record] = []
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()

    async def one(due: float, request: bytes) -> None:
        status = await _send(pool, request)
        finished = time.monotonic() - start
        records.append(Record(due, finished - due if status else float("inf"), status))

    for i in range(int(rate * duration_s)):
        due = i / rate
        delay = start + due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due, rng.choice(requests)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    pool.close()
    return sorted(records, key=lambda r: r.due)


async def closed_loop(url: str, requests: list[bytes], clients: int, duration_s: float, seed: int = 0) -> list[Record]:
    """`clients` clients, each sending its next request when the previous one is answered."""
    parts = urlsplit(url)
    records: list[Record] = []
    start = time.monotonic()

    async def client(k: int) -> None:
        pool = _Pool(parts.hostname, parts.port)
        rng = random.Random(seed * 1000 + k)
        while (sent := time.monotonic()) - start < duration_s:
            status = await _send(pool, rng.choice(requests))
            records.append(Record(sent - start, time.monotonic() - sent if status else float("inf"), status))
        pool.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return sorted(records, key=lambda r: r.due)


def run(coro):
    """Run a phase on uvloop when it is installed (the generator's own CPU cost matters on a small machine)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

"""/livez and /readyz that tell the truth about the worker processes.

BentoML answers both from whichever worker takes the connection, with no word about the others. With
several workers (the default: service/config.py, worker_count), one that died leaves the rest serving while
BentoML starts a new one outside a container; inside a container BentoML starts none, and the service stays
at reduced capacity for good. So both answers name the workers alive and expected, /readyz stays 200 while
this worker can serve, and /livez turns 503 when workers have been missing for LIVENESS_GRACE_S, long
enough for a restart to have happened, so that an orchestrator replaces the instance instead of keeping it
half-alive.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LIVENESS_GRACE_S = 30.0  # a worker restart takes a few seconds (model load and warm-up included)
READY_DIR_ENV = "TUNESERVE_READY_DIR"  # set by bentoml's main process, inherited by its workers
CONTROL_DIR_ENV = "TUNESERVE_CONTROL_DIR"  # the same, for the wanted model state (service/engine/versions.py)


def arm(in_worker: bool) -> None:
    """In bentoml's main process: a folder where each worker leaves its pid once it serves, and one where the
    workers share the wanted model state (new ones, whatever the process inherited: its workers are its own)."""
    if not in_worker:
        for env, prefix in ((READY_DIR_ENV, "tuneserve-workers-"), (CONTROL_DIR_ENV, "tuneserve-control-")):
            folder = tempfile.mkdtemp(prefix=prefix)
            os.environ[env] = folder
            atexit.register(shutil.rmtree, folder, ignore_errors=True)


def mark_ready() -> None:
    """In a worker whose model is loaded and warmed up."""
    folder = os.environ.get(READY_DIR_ENV)
    if folder and os.path.isdir(folder):
        Path(folder, str(os.getpid())).touch()


def ready_worker_pids() -> list[int]:
    """The pids of this server's workers that serve now (empty outside a BentoML server)."""
    import psutil

    folder = os.environ.get(READY_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return []
    pids = []
    for entry in os.scandir(folder):
        try:
            pid = int(entry.name)
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
                continue
        except (ValueError, psutil.Error):
            pass
        with contextlib.suppress(OSError):
            os.unlink(entry.path)  # a worker that is gone
    return sorted(pids)


@dataclass
class Health:
    expected_workers: int
    _short_since: float | None = None

    def workers_alive(self) -> int:
        """Worker processes of this server that serve now (this one included); 1 outside a BentoML server.
        A worker that died, or one started in its place and still loading its model, is not counted."""
        return max(len(ready_worker_pids()), 1)

    def report(self) -> dict:
        alive = self.workers_alive()
        now = time.monotonic()
        if alive >= self.expected_workers:
            self._short_since = None
        elif self._short_since is None:
            self._short_since = now
        missing_for = 0.0 if self._short_since is None else now - self._short_since
        return {"workers": {"alive": alive, "expected": self.expected_workers,
                            "missing_for_s": round(missing_for, 1)},
                "live": missing_for < LIVENESS_GRACE_S}

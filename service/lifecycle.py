"""How the server starts and when it gives up: a model that cannot be served stops it with one readable error
and a non-zero exit, never a worker restarted forever.

`bentoml serve` imports the service module twice over: once in its main process (the arbiter, which
starts the workers and restarts those that exit) and once in every worker. In the arbiter, the plan is
checked (the graph's sha256 and an onnxruntime load on the CPU) before any worker starts. A failure that
only a worker can meet (its device, its memory) is written to a file the arbiter knows, the worker asks the
arbiter to stop (SIGTERM to its parent), and the arbiter's exit prints the reason and exits with 1.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger("tuneserve.service")

FATAL_FILE_ENV = "TUNESERVE_FATAL_FILE"  # set by the arbiter, inherited by its workers
EXIT_FAILURE = 1
T = TypeVar("T")


def in_worker() -> bool:
    """True in a BentoML worker process (it sets its index before importing the service)."""
    from bentoml._internal.context import server_context

    return server_context.worker_index is not None


def resolve_or_exit(make: Callable[[], T]) -> T:
    """`make()` (the plan, checked), or one `error: ...` line and exit 1 when the model cannot be served."""
    try:
        return make()
    except (LookupError, ValueError, RuntimeError, OSError) as e:
        if in_worker():
            fail_worker(f"{e}")
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_FAILURE) from None


def arm_fatal_exit() -> None:
    """In the arbiter: give the workers a file to report a fatal start-up failure in, and exit 1 with its
    content when the server stops because of one."""
    if in_worker():
        return  # workers use their arbiter's file; an arbiter makes its own, whatever it inherited
    fd, path = tempfile.mkstemp(prefix="tuneserve-fatal-", suffix=".txt")
    os.close(fd)
    os.environ[FATAL_FILE_ENV] = path

    def report() -> None:
        message = Path(path).read_text().strip() if os.path.exists(path) else ""
        Path(path).unlink(missing_ok=True)
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_FAILURE)  # atexit cannot set the exit status otherwise

    atexit.register(report)


def fail_worker(message: str) -> None:
    """In a worker that cannot serve: log the reason once, hand it to the arbiter, stop the whole server."""
    log.error("%s; stopping the server", message)
    path = os.environ.get(FATAL_FILE_ENV)
    if path:
        Path(path).write_text(message + "\n")
        os.kill(os.getppid(), signal.SIGTERM)  # the arbiter: it stops every worker and exits
    os._exit(EXIT_FAILURE)  # no traceback, no restart by this process's own doing

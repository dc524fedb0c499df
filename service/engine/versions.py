"""The models a worker serves, by name, and how their versions change while it serves.

Model control (TUNESERVE_MODEL_CONTROL, named as Triton names it):
- none: the versions chosen at start are served.
- poll: every poll_interval_s each worker looks at the store; a newer complete version of a served name is
  loaded and warmed up beside the one serving, then switched to, and the old one is released once the
  requests it has in flight are answered. Every worker converges within the poll interval plus a load.
- explicit: the management API (/v2/repository/..., service/edges/routes.py) loads a name at a version, unloads
  it, or rolls it back to the version before. The worker that takes the call writes the wanted state to a
  file all workers of the server watch (every SYNC_INTERVAL_S; a worker that restarts reads it first), and
  answers once every serving worker reports that state: after the answer, any worker serves it.
A version that fails to load or to warm up is never switched to: the old one keeps serving, and the failure
shows in GET /models (state "failed", the error), the log and the tuneserve_model_load_failures metric.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuneserve.models.store import list_models, load_model
from tuneserve.service.engine.errors import RequestError
from tuneserve.service.engine.metrics import Metrics
from tuneserve.service.engine.model_version import ModelVersion
from tuneserve.service.health import CONTROL_DIR_ENV, ready_worker_pids
from tuneserve.service.plan import ModelChoice, ServingPlan

log = logging.getLogger("tuneserve.service")

SYNC_INTERVAL_S = 0.25  # how often workers look at the wanted state: the part of the bound not spent loading
CONVERGE_TIMEOUT_S = 120.0  # how long a management call waits for every worker before answering 504
_DESIRED = "desired.json"


@dataclass
class Slot:
    """One model name: the version it serves, what happened to the last change, and its history."""

    name: str
    served: ModelVersion | None = None
    state: str = "ready"  # ready, loading, failed (the last load; the old version still serves), unloaded
    error: str | None = None
    loading: str | None = None  # the version being loaded
    versions: list[str] = field(default_factory=list)  # served in this order (rollback goes one back)
    failed: set[str] = field(default_factory=set)  # versions that failed here: poll mode does not retry them

    def describe(self, default: bool) -> dict[str, Any]:
        served = self.served
        card = served.model.card if served else None
        return {"name": self.name, "version": served.version if served else None, "state": self.state,
                "default": default, "error": self.error, "loading": self.loading,
                "labels": card.num_classes if card else None,
                "metrics": {k: v for k, v in card.metrics.items() if isinstance(v, (int, float, str, bool))} if card else {}}


class ModelLoadFailed(RuntimeError):
    pass


class ModelVersions:
    """The versions a worker serves, by model name, and the model control that changes them. `load` makes a
    served version from a choice (blocking: load and warm-up); the starting ones load here."""

    def __init__(self, plan: ServingPlan, load: Callable[[ModelChoice], ModelVersion], metrics: Metrics):
        self.plan, self.load, self.metrics = plan, load, metrics
        self.default = plan.default
        self.slots: dict[str, Slot] = {}
        for choice in plan.models:
            self.slots[choice.name] = Slot(choice.name, load(choice), versions=[choice.stored.version])
        self._lock: asyncio.Lock | None = None  # one change at a time (each holds a model's memory twice)
        self._tasks: list[asyncio.Task] = []
        self._control = Path(os.environ[CONTROL_DIR_ENV]) if os.environ.get(CONTROL_DIR_ENV) else None
        self._desired_seen: float | None = None

    # -- serving -----------------------------------------------------------------------------------------------

    def get(self, name: str | None) -> ModelVersion:
        slot = self.slots.get(name or self.default)
        if slot is None or slot.served is None:
            served = ", ".join(n for n, s in self.slots.items() if s.served) or "none"
            raise RequestError(404, f"model {name or self.default!r} is not served here; served models: {served}")
        return slot.served

    def describe(self) -> list[dict[str, Any]]:
        return [slot.describe(name == self.default) for name, slot in self.slots.items()]

    def describe_one(self, name: str) -> dict[str, Any]:
        slot = self.slots.get(name)
        if slot is None:
            self.get(name)  # raises the 404
        described = slot.describe(name == self.default)
        return {**described, **(slot.served.describe() if slot.served else {})}

    # -- changing versions -------------------------------------------------------------------------------------

    async def switch(self, name: str, version: str | None = None) -> ModelVersion:
        """Serve `name` at `version` (None: its newest complete one): load and warm it up beside the current
        one, then switch; the old version is released once its requests are answered. ModelLoadFailed when
        the new one does not load: the old one keeps serving."""
        async with self._change_lock():
            slot = self.slots.setdefault(name, Slot(name))
            tag = f"{name}:{version}" if version else name
            slot.loading, slot.state = version or "newest", "loading"
            try:
                stored = await asyncio.to_thread(load_model, tag)
                if slot.served is not None and slot.served.version == stored.version:
                    slot.loading, slot.state, slot.error = None, "ready", None
                    return slot.served
                choice = self.plan.choose(stored)
                await asyncio.to_thread(choice.check)
                new = await asyncio.to_thread(self.load, choice)
            except Exception as e:  # noqa: BLE001 - whatever failed, the old version keeps serving
                slot.loading, slot.state, slot.error = None, "failed", f"{type(e).__name__}: {e}"
                slot.failed.add(version or tag)
                self.metrics.load_failed(name)
                log.error("could not load %s (%s); %s", tag, slot.error,
                          f"still serving {slot.served.tag}" if slot.served else "the model is not served")
                self._report()
                raise ModelLoadFailed(f"could not load {tag}: {slot.error}") from None
            old, slot.served = slot.served, new
            slot.versions.append(new.version)
            slot.loading, slot.state, slot.error = None, "ready", None
            log.info("now serving %s%s", new.tag, f" (was {old.tag})" if old else "")
            if old is not None:
                self._spawn(self._retire(old))
            self._report()
            return new

    async def unload(self, name: str) -> None:
        if name == self.default:
            raise RequestError(409, f"{name!r} is the default model (/classify, /model): it cannot be unloaded; "
                                 "serve another default with TUNESERVE_DEFAULT_MODEL")
        async with self._change_lock():
            slot = self.slots.get(name)
            if slot is None or slot.served is None:
                return
            old, slot.served, slot.state = slot.served, None, "unloaded"
            self._spawn(self._retire(old))
            log.info("unloaded %s", old.tag)
            self._report()

    def previous_version(self, name: str) -> str:
        slot = self.slots.get(name)
        if slot is None or slot.served is None:
            self.get(name)  # raises the 404
        earlier = [v for v in slot.versions if v != slot.served.version]
        if not earlier:
            raise RequestError(409, f"{name!r} has served no other version here: nothing to roll back to")
        return earlier[-1]

    async def _retire(self, old: ModelVersion) -> None:
        await old.drained()
        old.close()

    def _change_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # -- control modes -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        control = self.plan.config.model_control
        if control == "poll":
            self._spawn(self._poll())
        elif control == "explicit" and self._control is not None:
            await self._sync_once()  # a worker started late (a restart) takes the wanted state first
            self._spawn(self._sync())
        self._report()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for slot in self.slots.values():
            if slot.served is not None:
                slot.served.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.plan.config.poll_interval_s)
            newest: dict[str, str] = {}
            for m in await asyncio.to_thread(list_models):  # newest first
                newest.setdefault(m.name, m.version)
            for name, slot in list(self.slots.items()):
                version = newest.get(name)
                if slot.served is None or version is None or version == slot.served.version or version in slot.failed:
                    continue
                try:
                    await self.switch(name, version)
                except ModelLoadFailed:
                    pass  # reported by switch; the next poll does not retry this version

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            try:
                await self._sync_once()
            except Exception:  # noqa: BLE001 - a bad file or a failed load must not stop the watching
                log.exception("could not apply the wanted model state")

    async def _sync_once(self) -> None:
        path = self._control / _DESIRED
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._desired_seen:
            return
        self._desired_seen = mtime
        for name, want in json.loads(path.read_text()).items():
            slot = self.slots.get(name)
            if want.get("unloaded"):
                if slot is not None and slot.served is not None:
                    await self.unload(name)
            elif slot is None or slot.served is None or slot.served.version != want["version"]:
                try:
                    await self.switch(name, want["version"])
                except ModelLoadFailed:
                    pass

    # -- the management API's side (explicit mode) -------------------------------------------------------------

    async def change(self, name: str, want: dict[str, Any]) -> dict[str, Any]:
        """Make every worker serve `want` for `name` ({"version": v} or {"unloaded": True}); return how each
        worker stands. This worker applies it at once; the others through the shared file."""
        if self._control is not None:
            self._write_desired(name, want)
        if want.get("unloaded"):
            await self.unload(name)
        else:
            await self.switch(name, want["version"])
        return await self._converged(name, want)

    def _write_desired(self, name: str, want: dict[str, Any]) -> None:
        path = self._control / _DESIRED
        desired = json.loads(path.read_text()) if path.exists() else {}
        desired[name] = want
        tmp = path.with_name(f".{_DESIRED}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(desired))
        os.replace(tmp, path)

    def _report(self) -> None:
        """Tell the other workers (through the control folder) what this one serves."""
        if self._control is None:
            return
        status = {name: {"version": s.served.version if s.served else None, "state": s.state, "error": s.error}
                  for name, s in self.slots.items()}
        path = self._control / f"status-{os.getpid()}.json"
        with tempfile.NamedTemporaryFile("w", dir=self._control, delete=False, prefix=".status-") as f:
            json.dump(status, f)
        os.replace(f.name, path)

    async def _converged(self, name: str, want: dict[str, Any]) -> dict[str, Any]:
        """Wait until every serving worker reports `want` for `name`; RequestError 504 after CONVERGE_TIMEOUT_S,
        500 when a worker failed to load it (it keeps serving its old version)."""
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while True:
            workers = self._worker_states(name)
            failed = {pid: s for pid, s in workers.items() if s.get("state") == "failed"}
            if failed:
                raise RequestError(500, f"{len(failed)} worker(s) could not load {name}: "
                                     f"{next(iter(failed.values())).get('error')}; they keep serving the version before",
                                {})
            done = all(s.get("state") == "unloaded" if want.get("unloaded") else s.get("version") == want["version"]
                       for s in workers.values())
            if done:
                return {"name": name, **want, "workers": len(workers)}
            if time.monotonic() > deadline:
                raise RequestError(504, f"not every worker reported {name} {want} within {CONVERGE_TIMEOUT_S:g} s: "
                                     f"{workers}")
            await asyncio.sleep(SYNC_INTERVAL_S / 2)

    def _worker_states(self, name: str) -> dict[int, dict[str, Any]]:
        """{pid: state of `name`} for every worker serving now (just this one outside a BentoML server)."""
        if self._control is None:
            slot = self.slots.get(name)
            return {os.getpid(): {"version": slot.served.version if slot and slot.served else None,
                                  "state": slot.state if slot else "unloaded", "error": slot.error if slot else None}}
        states = {}
        for pid in ready_worker_pids() or [os.getpid()]:
            try:
                states[pid] = json.loads((self._control / f"status-{pid}.json").read_text()).get(
                    name, {"version": None, "state": "unloaded"})
            except (OSError, ValueError):
                states[pid] = {"state": "starting"}
        return states

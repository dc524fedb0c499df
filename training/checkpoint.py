"""Self-describing checkpoints, written atomically: a crash mid-write never corrupts the previous one.

Every checkpoint carries what it is (architecture, class names, preprocessing, the config that trained it,
its run folder and epoch) beside the weights, and with --ema the AveragedModel's state under "ema" (the weights
that get exported); last.pt adds what resuming needs (optimizer, scheduler, scaler, RNG state and the run's
Progress), best.pt the validation metrics of its epoch.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from tuneserve.training.ema import ema_weights

if TYPE_CHECKING:
    from tuneserve.training.progress import Progress


@dataclass(frozen=True)
class RunMeta:
    """What every checkpoint of a run says about itself."""

    arch: str
    classes: list[str]
    preprocessing: dict[str, Any]  # Preprocessing.to_dict()
    config: dict[str, Any]  # TrainConfig.to_dict()
    run_dir: str


@dataclass(frozen=True)
class Trainables:
    """The objects whose state a run saves and resumes."""

    model: torch.nn.Module  # unwrapped (no DDP), so keys do not depend on the world size
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None = None  # --ema: the average of `model`

    def gather(self) -> None:
        """Called by every rank before rank 0 saves; nothing to do for a model each rank holds whole (a
        sharded one gathers its full state here: training/sharding.py)."""

    def weights(self) -> dict[str, Any]:
        """What every checkpoint holds: the model's state dict, and the EMA's (n_averaged included) with --ema."""
        out = {"model": _cpu(self.model.state_dict())}
        if self.ema is not None:
            out["ema"] = _cpu(self.ema.state_dict())
        return out

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if "ema" not in ckpt:
                raise ValueError(f"cannot resume with --ema from {ckpt.get('path', 'this checkpoint')}: it holds no "
                                 "EMA state (its run was trained without --ema)")
            self.ema.load_state_dict(ckpt["ema"])


def save_epoch(run_dir: Path, meta: RunMeta, trainables: Trainables, progress: "Progress", improved: bool) -> None:
    """last.pt after every epoch; best.pt too when this epoch is the best so far."""
    common = {**dataclasses.asdict(meta), "epoch": progress.epoch, **trainables.weights()}
    save_atomic({**common, **trainables.state(), "rng": rng_state(), **progress.to_dict()}, Path(run_dir) / "last.pt")
    if improved:
        save_atomic({**common, "metrics": progress.history[-1]["val"]}, Path(run_dir) / "best.pt")


def deployed_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict a checkpoint exports: its EMA's when the run kept one (--ema), else its model's."""
    return ema_weights(ckpt["ema"]) if "ema" in ckpt else ckpt["model"]


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def load(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise ValueError(f"checkpoint {str(p)!r} does not exist (give a run folder or a .pt file)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise ValueError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise ValueError(f"{p} is not a tuneserve checkpoint (expected keys 'model' and 'arch')")
    ckpt["path"] = str(p)
    return ckpt


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        # as plain lists: weights_only loading refuses numpy arrays
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

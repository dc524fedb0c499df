"""Experiment tracking: what a run reports to TensorBoard and MLflow while it trains (`--report-to`).

One small interface, called on rank 0 only: the run's parameters at its start, the loss and learning rate
every LOG_EVERY optimizer steps, each epoch's validation metrics, images/s and confusion matrix, and at the
end the final metrics (TensorBoard's hparams view), the top losses and label issues pictures, and, for MLflow,
the ONNX model, the card, the plots, label_issues.csv and the history as artifacts of the run. Both libraries
are optional: asking for one that is not installed is an error that says what to install, before any training
starts.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

REPORTERS = ("tensorboard", "mlflow")
LOG_EVERY = 10  # optimizer steps between loss/lr points: each one is a device sync on a GPU
_EPOCH_METRICS = ("val_top1", "val_top5", "val_loss", "val_macro_f1", "train_loss", "train_top1", "images_per_s", "lr")


class Tracker(Protocol):
    def step(self, step: int, loss: float, lr: float) -> None: ...

    def epoch(self, epoch: int, row: dict[str, Any], confusion_png: Path) -> None: ...

    def finish(self, best: dict[str, Any], run_dir: Path, model_dir: Path | None) -> None: ...


def parse_report_to(value: str) -> list[str]:
    """'tensorboard,mlflow' -> the reporters; 'none' or '' -> []; ValueError naming the accepted ones."""
    names = [v.strip().lower() for v in value.split(",") if v.strip() and v.strip().lower() != "none"]
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise ValueError(f"--report-to {value!r}: {', '.join(bad)} is not a reporter; use tensorboard, mlflow, "
                         "several comma-separated, or none")
    return list(dict.fromkeys(names))


def open_trackers(names: list[str], run_dir: Path, experiment: str, config: dict[str, Any],
                  tracking_uri: str | None) -> "Trackers":
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, config))
        elif name == "mlflow":
            trackers.append(MLflowTracker(run_dir, experiment, config, tracking_uri))
    return Trackers(trackers)


def check_installed(names: list[str]) -> None:
    """Before training: a reporter whose library is missing is an error that says what to install."""
    import importlib.util

    needs = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
    missing = [n for n in names if importlib.util.find_spec(needs[n]) is None]
    if missing:
        raise ValueError(f"--report-to {','.join(missing)} needs {' and '.join(needs[n] for n in missing)}: "
                         "pip install 'tuneserve[tracking]'")


class Trackers:
    """Fans each call out to every tracker; a tracker that fails is logged and dropped, the run goes on."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception:  # noqa: BLE001 - tracking must never cost a training run
                log.exception("%s.%s failed; it reports nothing more for this run", type(t).__name__, method)
                self.trackers.remove(t)

    def step(self, step: int, loss: float, lr: float) -> None:
        self._each("step", step, loss, lr)

    def epoch(self, epoch: int, row: dict[str, Any], confusion_png: Path) -> None:
        self._each("epoch", epoch, row, confusion_png)

    def finish(self, best: dict[str, Any], run_dir: Path, model_dir: Path | None) -> None:
        self._each("finish", best, run_dir, model_dir)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as scalars (what both libraries' parameter views take); None as ''."""
    return {k: ("" if v is None else v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for k, v in config.items()}


# Pictures written at the end of a run (training/diagnostics.py) -> their TensorBoard image tag.
PICTURES = {"top_losses.png": "val/top_losses", "label_issues.png": "train/label_issues"}


def _rgb(png: Path) -> Any:
    """A PNG as uint8 (H, W, 3), what SummaryWriter.add_image takes with dataformats="HWC"."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.config = _flat(config)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/step_loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, epoch: int, row: dict[str, Any], confusion_png: Path) -> None:
        for key in _EPOCH_METRICS:
            if key in row:
                group, _, name = key.partition("_") if key.startswith(("val_", "train_")) else ("train", "", key)
                self.writer.add_scalar(f"{group}/{name}", row[key], epoch)
        if confusion_png.is_file():
            self.writer.add_image("val/confusion_matrix", _rgb(confusion_png), epoch, dataformats="HWC")
        self.writer.flush()

    def finish(self, best: dict[str, Any], run_dir: Path, model_dir: Path | None) -> None:
        for name, tag in PICTURES.items():  # the end-of-run diagnostics (training/diagnostics.py)
            if (run_dir / name).is_file():
                self.writer.add_image(tag, _rgb(run_dir / name), 0, dataformats="HWC")
        metrics = {f"hparam/{k}": best[k] for k in ("top1", "loss", "macro_f1") if k in best}
        self.writer.add_hparams(self.config, metrics, run_name=".")
        self.writer.close()


class MLflowTracker:
    """An MLflow run in experiment `experiment`: at `tracking_uri` (a server, or a local store), by default
    the file store RUN_DIR/../mlruns beside the runs."""

    def __init__(self, run_dir: Path, experiment: str, config: dict[str, Any], tracking_uri: str | None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri or (run_dir.parent / "mlruns").resolve().as_uri())
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params(_flat(config))

    def step(self, step: int, loss: float, lr: float) -> None:
        self.mlflow.log_metrics({"train_step_loss": loss, "lr_step": lr}, step=step)

    def epoch(self, epoch: int, row: dict[str, Any], confusion_png: Path) -> None:
        self.mlflow.log_metrics({k: float(row[k]) for k in _EPOCH_METRICS if k in row}, step=epoch)
        if confusion_png.is_file():
            self.mlflow.log_artifact(str(confusion_png), artifact_path=f"confusion/epoch-{epoch}")

    def finish(self, best: dict[str, Any], run_dir: Path, model_dir: Path | None) -> None:
        self.mlflow.log_metrics({f"best_{k}": float(best[k]) for k in ("top1", "loss", "macro_f1") if k in best})
        for name in ("history.csv", "history.json", "curves.png", "confusion_matrix.png", "val_report.json",
                     *PICTURES, "label_issues.csv"):
            if (run_dir / name).is_file():
                self.mlflow.log_artifact(str(run_dir / name))
        if model_dir is not None:  # the registered model: ONNX graph(s) and card
            for f in sorted(model_dir.iterdir()):
                if f.suffix in (".onnx", ".json"):
                    self.mlflow.log_artifact(str(f), artifact_path="model")
        self.mlflow.end_run()

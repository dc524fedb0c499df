"""Experiment tracking against the real libraries: one short run reports to TensorBoard (its event files read
back with TensorBoard's own reader) and to a real MLflow tracking server started here (read back with
MLflow's client); the effective configuration lands in the run folder as a file `--config` takes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tuneserve.service.process import free_port
from tuneserve.training.config import TrainConfig, make_config
from tuneserve.training.train import train
from support import QUICK_EXPORT, write_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port with a SQLite store and a local artifact root; its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = shutil.which("mlflow", path=str(__import__("pathlib").Path(sys.executable).parent)) or "mlflow"
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--default-artifact-root", str(root / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            # No job runner: MLflow's own background jobs start 8 more processes (16-18 s of CPU
                            # to start against 5.5 s without), none of which tracking a run uses.
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)


def test_a_run_reports_to_tensorboard_and_a_real_mlflow_server(tmp_path, mlflow_server):
    data = tmp_path / "data"
    for c, cls in enumerate(["alpha", "beta", "gamma"]):
        for i in range(12):
            write_image(data / cls / f"{i}.png", seed=c * 100 + i, size=(48, 40))
    cfg = TrainConfig(data=str(data), epochs=2, head_epochs=1, batch_size=2, loader_workers=0, name="tracked",
                      output_dir=str(tmp_path / "runs"), parity_images=4, report_to="tensorboard,mlflow",
                      image_size=64,  # not the default 224 px: 12x less compute, the same reports
                      tracking_uri=mlflow_server, **QUICK_EXPORT)
    result = train(cfg)
    run_dir = result.run_dir

    # The effective configuration, as a file `tuneserve train --config` takes: the same TrainConfig back.
    assert make_config(str(run_dir / "config.yaml")) == cfg

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"train/step_loss", "train/lr", "val/top1", "val/loss", "val/macro_f1", "train/images_per_s"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/top1")] == [1, 2]
    assert len(events.Scalars("train/step_loss")) >= 2  # every 10 optimizer steps: 14 steps an epoch here
    assert "val/confusion_matrix" in tags["images"] and len(events.Images("val/confusion_matrix")) == 2
    assert {"val/top_losses", "train/label_issues"} <= set(tags["images"])  # the end-of-run pictures

    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["epochs"] == "2" and run.data.params["report_to"] == "tensorboard,mlflow"
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["best_top1"] == pytest.approx(result.best_metrics["top1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.csv", "confusion_matrix.png", "curves.png", "model", "top_losses.png", "label_issues.png",
            "label_issues.csv"} <= artifacts, artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.onnx", "model/tuneserve.json"} <= model_files, model_files


def test_report_to_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="tensorboard, mlflow, several comma-separated, or none"):
        train(TrainConfig(data=str(tmp_path), report_to="wandb", output_dir=str(tmp_path)))

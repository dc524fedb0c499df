"""The adaptive schedule: how long a run trains, at what learning rate, and the head fitted before it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from tuneserve.training.config import TrainConfig, make_config
from tuneserve.training.distributed import DistEnv
from tuneserve.training.head_probe import fit_head
from tuneserve.training.schedule import Adaptive, fixed_factor, parse_duration
from tuneserve.training.train import train

from support import QUICK_EXPORT

SPE = 10  # optimizer steps per epoch in the unit tests


def rows(*pairs: tuple[float, float]) -> list[dict]:
    return [{"epoch": i + 1, "val_loss": loss, "val_top1": top1} for i, (loss, top1) in enumerate(pairs)]


def test_fixed_schedule_warms_up_and_decays_per_phase():
    f = [fixed_factor(s, steps_per_epoch=10, head_epochs=2, epochs=6, warmup_epochs=0.5) for s in range(60)]
    assert f[0] < f[2] < f[4] < f[5] == pytest.approx(1.0)  # linear warm-up over 5 steps, then the peak
    assert f[19] < 0.05  # head phase decays to ~0
    assert f[20] < f[24] < f[25] == pytest.approx(1.0)  # the full phase warms up again
    assert all(x >= y for x, y in zip(f[25:], f[26:]))  # then decays monotonically


def cycle(*top1: float, loss_from: float = 1.0) -> list[dict]:
    """Rows with the given validation top-1s and a loss falling 0.2% an epoch."""
    return rows(*[(loss_from * (1 - 0.002 * i), t) for i, t in enumerate(top1)])


def test_the_first_cycle_is_the_fixed_recipe():
    s = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30)
    assert [s.factor(i) for i in range(80)] == [fixed_factor(i, SPE, 2, 8, 0.5) for i in range(80)]


def test_a_run_still_learning_at_the_end_of_a_cycle_gets_another():
    s = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30)
    late_best = cycle(0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.8)  # the best top-1 at the last epoch
    assert s.after_epoch(late_best[:7], 70, 0.0, 1.0) == (False, "")
    stop, why = s.after_epoch(late_best, 80, 0.0, 1.0)
    assert not stop and "improved its top-1" in why and "another cycle of 3 epochs at 0.5x" in why
    assert s.cycles[-1] == [80, 30, 5, 0.5]  # half the first cycle's 6 full-phase epochs, half the peak
    assert s.factor(80) < s.factor(85) and s.factor(85) == pytest.approx(0.5)  # a warm restart at half the peak
    assert 0.5 > s.factor(100) > s.factor(109)
    better = late_best + cycle(0.78, 0.79, 0.81)
    assert s.after_epoch(better[:10], 100, 0.0, 1.0) == (False, "")
    stop, why = s.after_epoch(better, 110, 0.0, 1.0)
    assert not stop and "improved its top-1 in the last cycle (0.800 -> 0.810)" in why
    # after an extension only top-1 counts: a lower loss alone does not buy another cycle
    flat = better + rows((0.5, 0.8), (0.4, 0.8), (0.3, 0.81))
    stop, why = s.after_epoch(flat, 140, 0.0, 1.0)
    assert stop and "cycle 3 ended and validation did not improve its top-1 in the last cycle (best 0.810)" in why


def test_a_falling_loss_alone_buys_no_cycle_and_full_marks_stop():
    s = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30)
    falling = cycle(0.5, 0.6, 0.7, 0.7, 0.7, 0.7) + rows((0.9, 0.7), (0.8, 0.7))  # the loss 11% lower, top-1 flat
    stop, why = s.after_epoch(falling, 80, 0.0, 1.0)
    assert stop and "did not improve its top-1 in the last 2 epochs" in why and len(s.cycles) == 1
    perfect = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30)
    stop, why = perfect.after_epoch(cycle(0.5, 0.6, 1.0, 1.0, 1.0, 1.0) + rows((0.9, 1.0), (0.8, 1.0)), 80, 0.0, 1.0)
    assert stop and "100% top-1" in why  # nothing left to gain: the time a second cycle takes is wasted


def test_a_run_done_in_its_first_cycle_stops_as_the_fixed_recipe_did():
    s = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30)
    early = cycle(0.5, 0.9, 0.8, 0.8, 0.8, 0.8)  # best at epoch 2, then four epochs without
    assert s.after_epoch(early[:5], 50, 0.0, 1.0) == (False, "")
    stop, why = s.after_epoch(early, 60, 0.0, 1.0)
    assert stop and "early stop" in why
    done = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=0, max_epochs=30)
    stop, why = done.after_epoch(cycle(0.5, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8), 80, 0.0, 1.0)
    assert stop and "did not improve" in why


def test_max_epochs_bounds_the_cycles():
    s = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=9)
    stop, why = s.after_epoch(cycle(0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.8), 80, 0.0, 1.0)
    assert not stop and "another cycle of 1 epoch " in why  # 3 wanted, 1 left
    short = Adaptive(SPE, head_epochs=1, warmup_epochs=0.5, patience=4, max_epochs=3)
    assert short.cycles == [[10, 20, 5, 1.0]]  # a first cycle of max_epochs
    stop, why = short.after_epoch(cycle(0.5, 0.6, 0.8), 30, 0.0, 1.0)
    assert stop and "max_epochs 3 is reached" in why


def test_the_time_budget_compresses_the_cycle_then_stops():
    s = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30, time_budget_s=600)
    # 540 s usable (10% kept for export), 300 spent, epochs of 100 s: room for 2 of the 5 epochs left
    at = s.factor(30)
    stop, why = s.after_epoch(cycle(0.5, 0.6, 0.7), 30, 300.0, 100.0)
    assert not stop and "room for 2 of the cycle's 5 epochs left" in why
    assert s.cycles[-1] == [30, 20, 0, at] and s.factor(30) == at and s.factor(49) < 0.01  # the rest of the cosine
    late = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30, time_budget_s=600)
    stop, why = late.after_epoch(cycle(0.5, 0.6, 0.7), 30, 500.0, 100.0)
    assert stop and "no room for another epoch" in why


def test_a_resumed_run_continues_the_cycles_it_planned():
    s = Adaptive(SPE, head_epochs=2, warmup_epochs=0.5, patience=4, max_epochs=30)
    s.restore([{"cycles": [[20, 60, 5, 1.0], [80, 30, 5, 0.5]]}])
    assert s.end_step == 110 and s.factor(85) == pytest.approx(0.5)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1h30m", 5400), ("1.5h", 5400),
                                           ("2min", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["20", "fast", "0m", "m"])
def test_a_bad_duration_names_the_accepted_forms(text):
    with pytest.raises(ValueError, match="90s, 20m, 1h30m|longer than 0"):
        parse_duration(text)


def test_a_time_budget_with_fixed_epochs_is_refused():
    with pytest.raises(ValueError, match="drop one of them"):
        TrainConfig(epochs=5, time_budget="10m")
    with pytest.raises(ValueError, match="90s, 20m"):
        TrainConfig(time_budget="ten minutes")
    assert TrainConfig(probe_head=True).head_epochs == 0 and TrainConfig().head_epochs == 2  # probed / trained head
    assert TrainConfig(probe_head=True, init_from="m").head_epochs == 2  # a parent's head is trained already
    assert TrainConfig(weights="none").probes_head() is False  # random features: nothing to fit on


def test_the_probe_fits_the_head_on_frozen_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    backbone = [p.detach().clone() for p in net[1].parameters()]
    x = torch.randn(90, 3, 2, 2)
    y = torch.arange(90) % 3
    x[torch.arange(90), y, 0, 0] += 6.0  # each class lights its own pixel: separable through the random layer
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    before = (net(x).argmax(1) == y).float().mean().item()
    fitted = fit_head(net, "3", loader, DistEnv(), 3, None, 0.0, 0, False)
    after = (net(x).argmax(1) == y).float().mean().item()
    assert after >= 0.95 > before and fitted["photos"] == 90 and fitted["features"] == 16
    assert all(torch.equal(a, b) for a, b in zip(backbone, net[1].parameters()))  # the backbone is untouched
    assert fitted["train_top1"] == pytest.approx(after, abs=0.02)  # the standardisation folded in exactly


def test_a_default_run_records_its_schedule_and_a_probed_head(tiny_folder, tmp_path):
    result = train(TrainConfig(data=str(tiny_folder), batch_size=4, loader_workers=0, max_epochs=3, probe_head=True,
                               output_dir=str(tmp_path / "runs"), export=False, time_budget="1h", image_size=64))
    first = result.history[0]
    assert first["probe_head"]["photos"] == 15 and first["phase"] == "full"  # 6 a class, a fifth held out
    assert len(result.history) == 3 and result.history[-1]["cycles"] == [[0, 9, 1, 1.0]]  # 3 epochs of 3 steps
    assert "schedule" in result.history[-1]  # the end of the cycle: stopped, and why
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert (saved["epochs"], saved["time_budget"], saved["max_epochs"]) == (0, "1h", 3)
    said = (result.run_dir / "config.yaml").read_text()
    assert "# schedule, epoch 3: " in said  # what it chose and why, in the run's config
    assert make_config(str(result.run_dir / "config.yaml")).max_epochs == 3  # which stays a valid --config
    assert "schedule" in (result.run_dir / "history.csv").read_text().splitlines()[0]
    on_disk = json.loads((result.run_dir / "history.json").read_text())
    assert on_disk[-1]["cycles"] == result.history[-1]["cycles"]


def test_the_probe_is_exported_when_no_epoch_beats_it(tmp_path):
    from PIL import Image

    from tuneserve.models.preprocessing import preprocess_pixels as pixels_of
    from tuneserve.models.runtime import OnnxClassifier

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 40, 200)]):  # red and blue: the frozen features separate them
        for i in range(10):
            arr = np.clip(np.array(colour) + rng.integers(-30, 30, size=(48, 48, 3)), 0, 255).astype(np.uint8)
            (tmp_path / "data" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    # A learning rate that moves nothing: the trained epoch keeps the new random head.
    result = train(TrainConfig(data=str(tmp_path / "data"), epochs=1, head_epochs=1, lr=1e-12, batch_size=4,
                               loader_workers=0, image_size=64, output_dir=str(tmp_path / "runs"), parity_images=4,
                               **QUICK_EXPORT))
    assert result.best_epoch == 0 and result.best_metrics["top1"] == 1.0  # the probe, judged on the val photos
    assert result.history[0]["val_top1"] < 1.0  # the epoch, with the new head, did not beat it
    clf = OnnxClassifier(result.model.onnx_path, device="cpu")
    pp = result.model.card.preprocessing
    photos = sorted((tmp_path / "data").glob("c*/*.png"))
    pixels = np.stack([pixels_of(str(p), pp) for p in photos])  # (N, S, S, 3) uint8
    predicted = clf(clf.inputs(pixels, pp)).argmax(1)
    assert (predicted == [int(p.parent.name[1]) for p in photos]).mean() >= 0.95  # the probe is what was exported


def test_the_best_row_is_the_higher_top1_then_the_lower_loss_the_first_of_equals():
    from tuneserve.training.progress import best_of

    picked = best_of(rows((0.3, 0.9), (0.4, 0.95), (0.35, 0.95), (0.35, 0.95), (0.1, 0.9)))
    assert picked["epoch"] == 3

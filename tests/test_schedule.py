"""The adaptive schedule: how long a run trains, at what learning rate, and the head fitted before it."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import yaml

from tuneserve.training.config import TrainConfig, make_config
from tuneserve.training.distributed import DistEnv
from tuneserve.training.head_probe import fit_head
from tuneserve.training.schedule import Adaptive, fixed_factor, parse_duration, stalled_for
from tuneserve.training.train import train

SPE = 10  # optimizer steps per epoch in the unit tests


def rows(*pairs: tuple[float, float]) -> list[dict]:
    return [{"epoch": i + 1, "val_loss": loss, "val_top1": top1} for i, (loss, top1) in enumerate(pairs)]


def test_fixed_schedule_warms_up_and_decays_per_phase():
    f = [fixed_factor(s, steps_per_epoch=10, head_epochs=2, epochs=6, warmup_epochs=0.5) for s in range(60)]
    assert f[0] < f[2] < f[4] < f[5] == pytest.approx(1.0)  # linear warm-up over 5 steps, then the peak
    assert f[19] < 0.05  # head phase decays to ~0
    assert f[20] < f[24] < f[25] == pytest.approx(1.0)  # the full phase warms up again
    assert all(x >= y for x, y in zip(f[25:], f[26:]))  # then decays monotonically


def test_adaptive_holds_the_peak_while_validation_improves_then_decays_and_stops():
    s = Adaptive(SPE, head_epochs=0, warmup_epochs=0.5, patience=3, max_epochs=30)
    assert s.factor(0) < s.factor(4) < s.factor(5) == 1.0 == s.factor(10 * SPE)  # warm-up, then flat
    history = rows((1.0, 0.5), (0.8, 0.6), (0.7, 0.7), (0.69, 0.7), (0.71, 0.69), (0.7, 0.7), (0.695, 0.7))
    for epoch in range(1, 7):  # the 4th epoch's loss gain (1.4%) counts; then two epochs without: not yet
        assert s.after_epoch(history[:epoch], epoch * SPE, 0.0, 1.0) == (False, "")
    stop, why = s.after_epoch(history, 7 * SPE, 0.0, 1.0)  # under 1% better and a top-1 tie: the third stalled epoch
    assert not stop and "stopped improving" in why and "decaying over 2 epochs" in why  # max(2, ceil(7 / 4))
    assert s.state() == {"decay_start": 70, "decay_steps": 20}
    assert s.factor(70) == 1.0 and s.factor(80) == pytest.approx(0.5) and s.factor(90) == pytest.approx(0.0)
    assert s.after_epoch(history + rows((0.6, 0.8)), 80, 0.0, 1.0) == (False, "")
    stop, why = s.after_epoch(history + rows((0.6, 0.8), (0.6, 0.8)), 90, 0.0, 1.0)
    assert stop and "decay ended after epoch 9" in why


def test_noise_in_the_loss_is_not_learning():
    assert stalled_for(rows((1.0, 0.5), (0.995, 0.5), (0.992, 0.5))) == 2  # under 1% of the best loss
    assert stalled_for(rows((1.0, 0.5), (1.2, 0.52))) == 0  # a better top-1 is


def test_max_epochs_leaves_room_for_the_decay():
    s = Adaptive(SPE, head_epochs=0, warmup_epochs=0.5, patience=3, max_epochs=6)
    improving = rows(*[(1.0 - 0.1 * i, 0.5 + 0.05 * i) for i in range(4)])
    assert s.after_epoch(improving[:3], 30, 0.0, 1.0) == (False, "")
    stop, why = s.after_epoch(improving, 40, 0.0, 1.0)
    assert not stop and "max_epochs 6" in why and s.state() == {"decay_start": 40, "decay_steps": 20}


def test_the_time_budget_fits_the_decay_then_stops():
    s = Adaptive(SPE, head_epochs=0, warmup_epochs=0.5, patience=3, max_epochs=30, time_budget_s=600)
    improving = rows(*[(1.0 - 0.1 * i, 0.5 + 0.05 * i) for i in range(5)])
    # 540 s usable (10% kept for export), 300 spent, epochs of 100 s: room for 2, the decay's minimum
    stop, why = s.after_epoch(improving[:3], 30, 300.0, 100.0)
    assert not stop and "time budget" in why and "room for 2 more" in why and s.decay_steps == 20
    late = Adaptive(SPE, head_epochs=0, warmup_epochs=0.5, patience=3, max_epochs=30, time_budget_s=600)
    stop, why = late.after_epoch(improving[:3], 30, 500.0, 100.0)
    assert stop and "no room for another epoch" in why


def test_a_resumed_run_continues_the_decay_it_started():
    s = Adaptive(SPE, head_epochs=0, warmup_epochs=0.5, patience=3, max_epochs=30)
    s.restore([{"decay_start": 50, "decay_steps": 30}])
    assert s.state() == {"decay_start": 50, "decay_steps": 30} and s.factor(65) == pytest.approx(0.5)


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
    assert TrainConfig().head_epochs == 0 and TrainConfig(init_from="m").head_epochs == 2  # probed / trained head
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


def test_a_default_run_probes_the_head_and_records_its_schedule(tiny_folder, tmp_path):
    result = train(TrainConfig(data=str(tiny_folder), batch_size=4, loader_workers=0, max_epochs=3, patience=1,
                               output_dir=str(tmp_path / "runs"), export=False, time_budget="1h"))
    first = result.history[0]
    assert first["probe_head"]["photos"] == 15 and first["phase"] == "full"  # 6 a class, a fifth held out
    assert len(result.history) == 3 and result.history[-1]["decay_start"] is not None  # max_epochs leaves 1 for the decay
    assert any("schedule" in r for r in result.history)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert (saved["epochs"], saved["time_budget"], saved["max_epochs"]) == (0, "1h", 3)
    said = (result.run_dir / "config.yaml").read_text()
    assert "# schedule, epoch" in said and "decay" in said  # what it chose and why, in the run's config
    assert make_config(str(result.run_dir / "config.yaml")).max_epochs == 3  # which stays a valid --config
    assert "schedule" in (result.run_dir / "history.csv").read_text().splitlines()[0]
    on_disk = json.loads((result.run_dir / "history.json").read_text())
    assert on_disk[-1]["decay_steps"] == result.history[-1]["decay_steps"]

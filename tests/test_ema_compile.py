"""--ema (weight EMA: the formula, checkpoints, exact resume, export) and --compile (torch.compile: same checkpoint
keys as eager, export, a clear error where it cannot work)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import yaml

from tuneserve.cli import main as cli_main
from tuneserve.models.store import load_model
from tuneserve.training import checkpoint as ckpt_io
from tuneserve.training.config import TrainConfig, make_config
from tuneserve.training.ema import ema_weights, make_ema, resolve_decay
from tuneserve.training.export import load_weights
from tuneserve.training.train import train

from support import QUICK_EXPORT

# 15 training images in batches of 5: 3 optimizer steps per epoch, no ragged last batch (one shape to compile).
FAST = dict(batch_size=5, loader_workers=0, image_size=64)  # 64 px: a fraction of the compute of 224, the same checks


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).double()


def _float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and float buffers (BatchNorm's running mean and variance), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_ema_follows_the_formula_on_weights_and_batchnorm_statistics():
    model, decay = _tiny_net(), 0.75
    ema = make_ema(model, decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected: dict[str, torch.Tensor] = {}
    for step in range(3):
        x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (8,))
        nn.functional.cross_entropy(model(x), y).backward()  # train mode: BatchNorm statistics move too
        optimizer.step()
        optimizer.zero_grad()
        ema.update_parameters(model)
        live = _float_state(model)
        # torch's definition: the first update copies, then ema = decay * ema + (1 - decay) * current
        expected = live if step == 0 else {k: decay * expected[k] + (1 - decay) * live[k] for k in live}
        for k, v in _float_state(ema.module).items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-14, msg=f"step {step}: {k}")
    assert "1.running_mean" in expected and not torch.equal(expected["1.running_mean"], live["1.running_mean"])
    assert not torch.equal(expected["5.weight"], live["5.weight"])  # the average lags the live weights
    assert int(ema.n_averaged) == 3
    assert set(ema_weights(ema.state_dict())) == set(model.state_dict())  # exportable under the model's own keys


def test_ema_decay_default_follows_the_run_length_and_bad_values_are_named(tmp_path):
    assert resolve_decay(0.99, 10) == 0.99
    assert resolve_decay(-1, 64) == pytest.approx(1 - 10 / 64)  # hymenoptera's 8 epochs x 8 steps
    assert resolve_decay(-1, 10**6) == 0.9998  # timm's, for long runs
    assert resolve_decay(-1, 5) == 0.0  # fewer steps than the window: nothing to average
    for bad in (1.0, 0.0, -0.5):
        with pytest.raises(ValueError, match=rf"ema_decay must be in \(0, 1\), or -1 .*got {bad}"):
            TrainConfig(ema_decay=bad)
    (tmp_path / "c.yaml").write_text("ema: maybe\n")
    with pytest.raises(ValueError, match=r"ema='maybe' is not a valid bool \(true/false, yes/no or 1/0\)"):
        make_config(str(tmp_path / "c.yaml"))


def test_ema_run_checkpoints_exports_and_resumes_exactly(tiny_folder, tmp_path):
    """Head phase then full phase with --ema: checkpoints hold the EMA, the EMA is what is registered, and a run
    interrupted after epoch 1 and resumed ends with the uninterrupted run's EMA, bit for bit."""
    # On the CPU: bit for bit is what CUDA's autotuned kernels and bf16 cannot promise.
    common = dict(data=str(tiny_folder), epochs=2, head_epochs=1, ema=True, ema_decay=0.5, seed=3, device="cpu", **FAST)
    full = train(TrainConfig(output_dir=str(tmp_path / "a"), name="ema-tiny", **common, **QUICK_EXPORT))
    best, last = ckpt_io.load(full.run_dir / "best.pt"), ckpt_io.load(full.run_dir / "last.pt")
    assert int(last["ema"]["n_averaged"]) == 6  # 2 epochs x 3 optimizer steps
    assert any(not torch.equal(best["model"][k], v) for k, v in ckpt_io.deployed_weights(best).items())
    registered = load_weights(load_model(full.model.tag))
    for k, v in ckpt_io.deployed_weights(best).items():
        assert torch.equal(registered[k], v), k  # the EMA's weights, not the live model's
    history = json.loads((full.run_dir / "history.json").read_text())
    assert all("live_val_top1" in h for h in history)
    saved = yaml.safe_load((full.run_dir / "config.yaml").read_text())
    assert (saved["ema"], saved["ema_decay"], saved["compile"]) == (True, 0.5, False)

    def interrupt(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output_dir=str(tmp_path / "b"), export=False, **common), on_epoch_end=interrupt)
    (run_b,) = (tmp_path / "b").iterdir()
    after_one = ckpt_io.load(run_b)["ema"]
    assert int(after_one["n_averaged"]) == 3
    resumed = train(TrainConfig(resume=str(run_b), loader_workers=0, export=False))
    again = ckpt_io.load(resumed.run_dir / "last.pt")["ema"]
    assert int(again["n_averaged"]) == 6  # continued from the saved count, not restarted
    for k, v in last["ema"].items():
        assert torch.equal(again[k], v), k


@pytest.mark.slow
def test_compiled_run_survives_unfreezing_checkpoints_and_exports_the_plain_model(tiny_folder, tmp_path):
    """Head phase then full phase under torch.compile (requires_grad changes, Dynamo recompiles, training goes
    on), with an EMA; its checkpoints have the eager run's keys and the registered graph is the plain model.
    What is checked is Dynamo's wrapping and recompiling, which every backend shares: the run uses aot_eager
    (Dynamo, AOTAutograd's forward and backward graphs, no generated code), because Inductor's cold C++
    compilation of ResNet-18's two phases takes 60-100 s on 2 cores. Inductor itself is checked below on the
    probe that every --compile run starts with."""
    common = dict(data=str(tiny_folder), arch="resnet18", weights="none", epochs=2, head_epochs=1, **FAST)
    eager = train(TrainConfig(output_dir=str(tmp_path / "eager"), export=False, **common))
    compiled = train(TrainConfig(output_dir=str(tmp_path / "compiled"), name="compiled-tiny", compile=True, ema=True,
                                 compile_backend="aot_eager", **common))
    assert [h["phase"] for h in compiled.history] == ["head", "full"]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in compiled.history)
    keys = list(ckpt_io.load(compiled.run_dir / "best.pt")["model"])
    assert keys == list(ckpt_io.load(eager.run_dir / "best.pt")["model"])
    assert not any("_orig_mod" in k for k in keys)
    assert compiled.model is not None
    recorded = load_model(compiled.model.tag).card.train_config
    assert (recorded["compile"], recorded["compile_backend"]) == (True, "aot_eager")
    assert set(load_weights(load_model(compiled.model.tag))) == set(keys)


def test_inductor_compiles_and_runs_the_probe_on_this_machine():
    """The default backend's whole path (Dynamo, Inductor's C++ code generation, the compiler, the run) on the
    function every --compile run is checked with first; an error here would be the one line users get."""
    from tuneserve.training.compilation import check_compile

    check_compile(torch.device("cpu"), "inductor")


def test_a_compile_backend_without_compile_is_refused():
    with pytest.raises(ValueError, match="compile_backend='aot_eager' is used only with compile=True: add --compile"):
        TrainConfig(data="x", compile_backend="aot_eager")


def test_compile_without_a_compiler_is_one_line_naming_the_flag(tiny_folder, tmp_path, capsys):
    import torch._inductor.config as inductor_config

    torch.compiler.reset()  # forget what earlier tests compiled, so the probe compiles again
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        # --device cpu: the probe needs the C++ compiler on CPU (Triton on CUDA, which this does not take away).
        code = cli_main(["train", "--data", str(tiny_folder), "--output-dir", str(tmp_path / "runs"), "--torchcompile",
                         "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: --compile cannot work on this machine (") and "C++ compiler" in err
    assert not (tmp_path / "runs").exists()  # refused before any work
    torch.compiler.reset()

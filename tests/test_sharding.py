"""`--shard fsdp` (FSDP2) on CPU ranks (gloo): the sharding plan, the settings it refuses, one process, exact
steps against one process in float64, full-state checkpoints that round-trip, and the real CLI under torchrun
against DDP (both from the decoded-image cache, built once for both ranks)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from support import (ARCH, QUICK_EXPORT_FLAGS, cli_flags, equivalence_steps, fsdp_equivalence_rank, max_diff,
                     sharded_checkpoint_rank, train_rank, write_image)
from tuneserve.cli import main as cli_main
from tuneserve.models.architectures import get_architecture
from tuneserve.models.store import load_model
from tuneserve.models.weights import build_model
from tuneserve.training import checkpoint as ckpt_io
from tuneserve.training.config import TrainConfig
from tuneserve.training.data import Sample
from tuneserve.training.distributed import DistEnv
from tuneserve.training.ema import ema_weights
from tuneserve.training.sharding import shard_plan
from tuneserve.training.train import train


def _bf16_channels_last_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """A channels_last model sharded under the bf16 policy: one step on channels_last input; rank 0 writes the
    all-gathered parameters' dtype seen in forward, the gradients' and the master weights' dtypes."""
    from support import join
    from tuneserve.training.distributed import cleanup, setup
    from tuneserve.training.sharding import shard_model

    join(rank, world_size, port)
    env = setup("cpu")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
        model = model.to(memory_format=torch.channels_last)
        seen: list[torch.dtype] = []
        model[0].register_forward_hook(lambda m, args, output: seen.append(m.weight.dtype))
        shard_model(model, env, mixed_precision=torch.bfloat16)
        x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
        model(x).float().sum().backward()
        if rank == 0:
            torch.save({"forward": str(seen[0]), "grad": str(model[0].weight.grad.dtype),
                        "master": str(model[0].weight.dtype)}, f"{out}/dtypes.pt")
    finally:
        cleanup(env)


def test_mixed_precision_policy_is_bf16_all_gathers_with_fp32_reductions_only_under_bf16():
    from tuneserve.training.sharding import mixed_precision_policy

    bf16 = mixed_precision_policy(torch.bfloat16)
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    for amp in (None, torch.float16):  # fp32 runs, and fp16 under the GradScaler: parameters stay fp32
        assert mixed_precision_policy(amp).param_dtype is None and mixed_precision_policy(amp).reduce_dtype is None


@pytest.mark.slow
def test_a_channels_last_model_shards_and_all_gathers_in_bf16(ranks, tmp_path):
    ranks.run(_bf16_channels_last_rank, str(tmp_path))
    dtypes = torch.load(tmp_path / "dtypes.pt")
    assert dtypes == {"forward": "torch.bfloat16", "grad": "torch.float32", "master": "torch.float32"}


def test_shard_plan_makes_each_listed_block_a_unit():
    resnet = get_architecture("resnet18").build(3)
    assert shard_plan(resnet) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]  # stem and fc: root
    lite = shard_plan(get_architecture(ARCH).build(3))
    assert len(lite) == 16 and all(name.startswith("blocks.") and name.count(".") == 2 for name in lite)
    convnext = shard_plan(get_architecture("convnext_tiny").build(3))
    # the stem (Conv2dNormActivation, a Sequential subclass) is a unit; stages (plain Sequential) are not
    assert "features.0" in convnext and "features.1.0" in convnext and "features.1" not in convnext
    for plan in (lite, convnext):
        assert not any(a != b and b.startswith(a + ".") for a in plan for b in plan)  # no unit inside another


@pytest.mark.parametrize("values, message", [
    (dict(shard="fsdp", local_sgd_period=4), "shard='fsdp' cannot be combined with local_sgd_period=4: local SGD "
                                             "averages whole parameters through a DDP communication hook"),
    (dict(shard="fsdp", compile=True), "shard='fsdp' cannot be combined with compile=True: torch.compile splits"),
    (dict(shard="zero3"), "shard='zero3' is not one of: none, fsdp"),
])
def test_shard_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_shard_refusal_is_one_readable_line(tiny_folder, capsys):
    assert cli_main(["train", "--data", str(tiny_folder), "--shard", "fsdp", "--local-sgd-period", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard='fsdp' cannot be combined with local_sgd_period=2") and err.count("\n") == 1


def test_fully_shard_needs_a_process_group(monkeypatch):
    """Why one process trains unsharded: torch's fully_shard needs a process group (it tries to create one from
    torchrun's environment), and over one rank it would shard nothing anyway."""
    from torch.distributed.fsdp import fully_shard

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="environment variable RANK expected"):
        fully_shard(nn.Linear(2, 2))
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_one_process_trains_unsharded_with_full_state_checkpoints_and_resumes(tiny_folder, tmp_path, caplog):
    """Without torchrun, --shard fsdp trains as one process would; its checkpoints are those of a sharded run
    (optimizer states keyed by parameter name), so a run resumes under any world size."""
    caplog.set_level(logging.INFO, logger="tuneserve.training.train")
    common = dict(data=str(tiny_folder), head_epochs=1, batch_size=4, loader_workers=0, export=False, shard="fsdp",
                  ema=True, output_dir=str(tmp_path / "runs"), image_size=64)  # 64 px: 12x less compute than 224
    first = train(TrainConfig(epochs=1, **common))  # the head phase; resumed below for one full-phase epoch
    assert "one process has nothing to shard across" in caplog.text
    ckpt = ckpt_io.load(first.run_dir)
    model = build_model(ARCH, 3, "none")
    assert set(ckpt["optimizer"]["state"]) <= set(dict(model.named_parameters()))  # names, not indices
    model.load_state_dict(ckpt["model"])  # strict: the keys and shapes of the plain network
    resumed = train(TrainConfig(epochs=2, resume=str(first.run_dir), **{k: v for k, v in common.items()
                                                                        if k != "output_dir"}))
    assert resumed.run_dir == first.run_dir and [h["phase"] for h in resumed.history] == ["head", "full"]


@pytest.mark.slow
def test_two_sharded_ranks_step_exactly_like_one_process(ranks, tmp_path):
    """FSDP2 over 2 ranks x batch 3 x 2 accumulation steps (reduce-scattered gradients, the global norm clipped
    from the shards) ends with the parameters of 1 process x batch 12, in float64 (as the DDP test does)."""
    samples = [Sample(str(write_image(tmp_path / "img" / f"{i}.png", seed=i, size=(48, 40))), i % 3) for i in range(24)]
    run = dict(images=24, batch=3, accum=2)
    ranks.run(fsdp_equivalence_rank, samples, run, str(tmp_path))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = equivalence_steps(DistEnv(), samples, 12, 1, "frozen")
    assert max_diff(rank0, rank1) == 0.0
    assert max_diff(rank0, single) < 1e-10
    torch.manual_seed(0)
    start = dict(build_model(ARCH, 3, "imagenet").double().named_parameters())
    assert max_diff(rank0, {k: v for k, v in start.items() if not k.startswith("classifier")}) > 1e-4  # it trained


@pytest.mark.slow
def test_sharded_checkpoints_hold_the_full_state_and_load_back(ranks, tmp_path):
    ranks.run(sharded_checkpoint_rank, str(tmp_path))
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    reloaded = torch.load(tmp_path / "reloaded.pt", weights_only=True)
    plain = build_model(ARCH, 3, "none")
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert {k: v.shape for k, v in saved["model"].items()} == shapes  # whole tensors, the plain network's keys
    assert {k: v.shape for k, v in ema_weights(saved["ema"]).items()} == shapes
    assert int(saved["ema"]["n_averaged"]) == 2
    plain.load_state_dict(ckpt_io.deployed_weights(saved))  # what export loads
    for part in ("model", "ema"):
        assert saved[part].keys() == reloaded[part].keys()
        assert all(torch.equal(saved[part][k], reloaded[part][k]) for k in saved[part]), part
    moments = saved["optimizer"]["state"]
    # the frozen stem has no AdamW state, and gets none when loaded (its first step starts AdamW afresh)
    assert moments.keys() == reloaded["optimizer"]["state"].keys() == dict(plain.named_parameters()).keys() - {
        "conv_stem.weight"}
    for name, state in moments.items():
        assert state["exp_avg"].shape == shapes[name]
        assert all(torch.equal(v, reloaded["optimizer"]["state"][name][k]) for k, v in state.items()), name
    assert torch.load(tmp_path / "rank1.pt")["n_averaged"] == 2  # the EMA's count reached every rank


# The run both launches below make: `torchrun ... tuneserve train --shard fsdp`, and its DDP reference in this
# module's rank processes (the same train(), without two more process starts).
TINY_RUN = dict(device="cpu", epochs=2, head_epochs=1, batch_size=2, val_fraction=0.5, grad_clip=0.1, loader_workers=0,
                image_size=64)


def _torchrun(data, out, name: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "tuneserve", "train",
           "--data", str(data), *cli_flags(TINY_RUN), "--ema", "--no-diagnostics",
           "--output-dir", str(out), "--name", name, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent)


@pytest.mark.slow
def test_torchrun_shard_fsdp_trains_like_ddp_and_registers_a_model(ranks, tiny_folder, tmp_path):
    """`torchrun --nproc-per-node 2 -m tuneserve train --shard fsdp` (head phase, then full phase; weight EMA;
    9 validation images, so rank 0 has one batch more than rank 1) against the same run under DDP: the same
    history and, up to float32 summation order, the same weights; full checkpoints; a registered model.
    Both train from the decoded-image cache (--pipeline cache), which local rank 0 builds while rank 1 waits."""
    fsdp = _torchrun(tiny_folder, tmp_path / "fsdp", "tiny-fsdp", "--shard", "fsdp", "--parity-images", "4",
                     "--pipeline", "cache", "--cache-dir", str(tmp_path / "cache-fsdp"), *QUICK_EXPORT_FLAGS)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "FSDP (sharded): 2 ranks x batch 2" in fsdp.stderr
    ranks.run(train_rank, dict(data=str(tiny_folder), ema=True, export=False, diagnostics=False,
                               output_dir=str(tmp_path / "ddp"), name="tiny-ddp", pipeline="cache",
                               cache_dir=str(tmp_path / "cache-ddp"), **TINY_RUN))
    for cache in ("cache-fsdp", "cache-ddp"):  # one cache each, built once for both ranks, no leftovers
        assert [p.suffix for p in (tmp_path / cache).iterdir()] == [".u8"], cache
    (run_f,), (run_d,) = (tmp_path / "fsdp").iterdir(), (tmp_path / "ddp").iterdir()
    hist_f, hist_d = (json.loads((r / "history.json").read_text()) for r in (run_f, run_d))
    assert [h["phase"] for h in hist_f] == ["head", "full"]
    for f, d in zip(hist_f, hist_d, strict=True):
        assert int(np.array(f["val"]["confusion"]).sum()) == 9  # every validation image once
        assert f["train_loss"] == pytest.approx(d["train_loss"], abs=1e-4)
        assert f["val_loss"] == pytest.approx(d["val_loss"], abs=1e-4)
        assert f["live_val_loss"] == pytest.approx(d["live_val_loss"], abs=1e-4)
    last_f, last_d = ckpt_io.load(run_f), ckpt_io.load(run_d)
    for part in ("model", "ema"):
        assert {k: v.shape for k, v in last_f[part].items()} == {k: v.shape for k, v in last_d[part].items()}
        for k, v in last_d[part].items():  # AdamW turns float32 rounding of ~0 gradients into +-lr steps
            if v.is_floating_point():
                assert (last_f[part][k] - v).abs().max() <= 1e-3 * max(1.0, v.abs().max().item()), (part, k)
    assert load_model("tiny-fsdp").card.metrics["val_images"] == 9

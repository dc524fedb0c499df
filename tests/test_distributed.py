"""Distributed training on CPU (gloo): exact DDP equivalence, local SGD, two hosts, `--gpus`, and 2-rank quality
against a one-process fine-tune of real photos, which is also served as it was validated."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch

from support import QUICK_EXPORT, QUICK_EXPORT_FLAGS, hymenoptera_subset, shadowing_packages, write_image
from support import ARCH, cli_flags, equivalence_rank, equivalence_steps, local_sgd_rank, max_diff
from tuneserve.models.store import load_model
from tuneserve.models.weights import build_model
from tuneserve.training.config import TrainConfig
from tuneserve.training.data import Sample
from tuneserve.training.distributed import DistEnv, make_local_sgd
from tuneserve.training.train import _check_distributed, train
from tuneserve.cli import main as cli_main
from tuneserve.training.evaluate import evaluate_stored
from tuneserve.launch import torchrun_command
from tuneserve.parsers import build_parser


@pytest.mark.slow
def test_two_ranks_step_exactly_like_one_process_with_twice_the_batch(ranks, tmp_path):
    """2 ranks x batch 3 end with the parameters of 1 process x batch 6 after 3 steps, and 2 ranks x 3 x 2
    accumulation steps with those of 1 x 12; train-mode BatchNorm (per-rank batch statistics) is the control."""
    samples = [Sample(str(write_image(tmp_path / "img" / f"{i}.png", seed=i, size=(48, 40))), i % 3) for i in range(36)]
    runs = [dict(images=18, batch=3, accum=1, bn="frozen"), dict(images=36, batch=3, accum=2, bn="frozen"),
            dict(images=18, batch=3, accum=1, bn="train")]
    ranks.run(equivalence_rank, samples, runs, str(tmp_path))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    one = DistEnv()  # this process, batch 2 x 3 (x 2 for the accumulation run), no process group
    single = [equivalence_steps(one, samples[: r["images"]], 2 * r["batch"] * r["accum"], 1, r["bn"]) for r in runs]
    for i, run in enumerate(runs):
        assert max_diff(rank0[i], rank1[i]) == 0.0, run  # DDP keeps the ranks in lockstep
    assert max_diff(rank0[0], single[0]) < 1e-10  # float64: equal up to rounding
    assert max_diff(rank0[1], single[1]) < 1e-10  # no_sync gradient accumulation included
    assert max_diff(rank0[2], single[2]) > 1e-4  # per-rank BatchNorm statistics: a different run
    torch.manual_seed(0)
    start = dict(build_model(ARCH, 3, "imagenet").double().named_parameters())
    assert max_diff(rank0[0], {k: v for k, v in start.items() if not k.startswith("classifier")}) > 1e-4  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("intra_node", [False, True], ids=["local", "intra-node"])
def test_local_sgd_ranks_agree_after_each_averaging_and_differ_between(ranks, intra_node, tiny_folder, tmp_path):
    """The real train() on 2 ranks with local SGD (period 3 after 2 synchronous steps), head phase then full
    phase (a new DDP wrapper): ranks hold the same parameters after the synchronous steps and right after each
    averaging, different ones on the local steps between, and always evaluate the same (averaged) model.
    intra-node: both ranks on one node, whose gradient all-reduce keeps them equal at every step."""
    period, warmup = 3, 2
    cfg = dict(data=str(tiny_folder), epochs=3, head_epochs=1, batch_size=2, loader_workers=0, export=False,
               output_dir=str(tmp_path / "runs"), local_sgd_period=period, local_sgd_warmup_steps=warmup,
               local_sgd_intra_node=intra_node, image_size=64)  # 64 px: 12x less compute than 224, same steps
    ranks.run(local_sgd_rank, cfg, 2 if intra_node else 1, str(tmp_path))  # ranks per node: 2, or 1 (two "nodes")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(rank0["steps"]) == len(rank1["steps"]) == 12  # 15 images -> 8 per rank, batch 2: 4 steps x 3 epochs
    gaps = [(a - b).abs().max().item() for a, b in zip(rank0["steps"], rank1["steps"])]
    for step, gap in enumerate(gaps):
        if intra_node or step < warmup or (step - warmup) % period == 0:  # synchronous, or averaged (2, 5, 8, 11)
            assert gap <= 1e-6, (step, gaps)
        else:
            assert gap > 1e-6, (step, gaps)
    assert len(rank0["evals"]) == 4  # the linear probe (the candidate model) before training, then every epoch
    for a, b in zip(rank0["evals"], rank1["evals"]):
        assert (a - b).abs().max().item() <= 1e-6  # the probe fitted alike on every rank; averaged at each epoch's end
    (run,) = (tmp_path / "runs").iterdir()
    history = json.loads((run / "history.json").read_text())
    assert [h["phase"] for h in history] == ["head", "full", "full"]
    assert [int(np.array(h["val"]["confusion"]).sum()) for h in history] == [3, 3, 3]


@pytest.mark.parametrize("values, message", [
    (dict(local_sgd_period=1), "local_sgd_period must be 0 .* got 1; 1 would all-reduce parameters every step"),
    (dict(local_sgd_period=-2), "local_sgd_period must be 0 .* got -2"),
    (dict(local_sgd_warmup_steps=-1), "local_sgd_warmup_steps must be >= 0, got -1"),
])
def test_local_sgd_settings_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_sync_bn_on_cpu_ranks_is_refused_up_front():
    with pytest.raises(ValueError, match="sync_bn needs CUDA ranks"):
        _check_distributed(TrainConfig(sync_bn=True), DistEnv(rank=1, world_size=2))
    _check_distributed(TrainConfig(sync_bn=True), DistEnv())  # one process: no-op, nothing to sync


def test_local_sgd_intra_node_needs_equal_nodes():
    with pytest.raises(ValueError, match="world size 5 is not a multiple of this node's 2"):
        make_local_sgd(3, 0, True, 0, DistEnv(rank=0, world_size=5, local_world_size=2))
    assert make_local_sgd(3, 0, True, 0, DistEnv()) is None  # one process: plain training


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair, 10.77.0.1/24 <-> 10.77.0.2/24: two "hosts" that reach each
    other over that link only. Names are unique per run (parallel runs do not collide; the addresses cannot,
    since each pair is its own isolated link) and everything is deleted afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("two-host test needs iproute2's `ip` to create network namespaces; it is not installed")
    tag = uuid.uuid4().hex[:8]
    hosts = [(f"tsA{tag}", f"tvA{tag}", "10.77.0.1"), (f"tsB{tag}", f"tvB{tag}", "10.77.0.2")]
    made: list[str] = []
    try:
        for ns, _, _ in hosts:
            proc = _ip("netns", "add", ns)
            if proc.returncode != 0:
                pytest.skip(f"cannot create network namespaces (needs root or CAP_NET_ADMIN): `ip netns add` said: "
                            f"{proc.stderr.strip()}")
            made.append(ns)
        (ns_a, if_a, _), (ns_b, if_b, _) = hosts
        steps = [("link", "add", if_a, "type", "veth", "peer", "name", if_b),
                 ("link", "set", if_a, "netns", ns_a), ("link", "set", if_b, "netns", ns_b)]
        for ns, dev, addr in hosts:
            steps += [("-n", ns, "addr", "add", f"{addr}/24", "dev", dev), ("-n", ns, "link", "set", dev, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            proc = _ip(*step)
            assert proc.returncode == 0, f"ip {' '.join(step)}: {proc.stderr}"
        yield hosts
    finally:
        _ip("link", "del", hosts[0][1])  # only left in this namespace if moving it failed
        for ns in made:
            _ip("netns", "del", ns)  # takes its end of the veth pair with it


@pytest.mark.slow
def test_two_hosts_torchrun_c10d(two_hosts, tiny_folder, tmp_path):
    """`torchrun --nnodes 2` (c10d rendezvous) in two network namespaces, one rank each, gloo over the veth
    pair: the run sees world size 2 (every validation image counted once, training padded to 8 per rank)."""
    (_, _, addr_a), _ = two_hosts
    run_id = f"two-hosts-{uuid.uuid4().hex[:8]}"
    procs = []
    for ns, dev, addr in two_hosts:
        # is_host: torchrun guesses whether it hosts the rendezvous store from the hostname's addresses, which
        # are the machine's, not the namespace's; --local-addr: the address the other host reaches this one at.
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr_a}:29400",
               "--rdzv-id", run_id, "--rdzv-conf", f"is_host={int(addr == addr_a)},join_timeout=120",
               "--local-addr", addr,
               "-m", "tuneserve", "train", "--data", str(tiny_folder), "--epochs", "2", "--batch-size", "2",
               "--loader-workers", "0", "--output-dir", str(tmp_path / "runs"), "--no-export", "--device", "cpu",
               "--image-size", "64", "--no-diagnostics"]
        with open(tmp_path / f"{ns}.out", "w") as out, open(tmp_path / f"{ns}.err", "w") as err:  # no pipe to fill
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, cwd=tmp_path,
                                          env={**os.environ, "GLOO_SOCKET_IFNAME": dev}))
    try:
        deadline = time.monotonic() + 300
        # Poll both: when one host fails, the other would wait for its peer until the rendezvous timeout.
        while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()  # torchrun passes SIGTERM on to its worker
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    outputs = [((tmp_path / f"{ns}.out").read_text(), (tmp_path / f"{ns}.err").read_text()) for ns, _, _ in two_hosts]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    history = json.loads((run / "history.json").read_text())
    assert [int(np.array(h["val"]["confusion"]).sum()) for h in history] == [3, 3]  # 3 val images, not 2 x 2
    assert history[0]["train_images"] == 16  # 15 training images, padded to 8 per rank
    assert sum(out.count("run folder:") for out, _ in outputs) == 1  # rank 0 reports, on one of the hosts


@pytest.mark.parametrize("extra, env, message", [
    (["--gpus", str(torch.cuda.device_count() + 1)], {}, f"asks for {torch.cuda.device_count() + 1} CUDA GPU(s), "
                                                          f"but torch sees {torch.cuda.device_count()}"),
    (["--gpus", "0"], {}, "--gpus must be >= 1, got 0"),
    (["--gpus", "2", "--device", "cpu"], {}, "contradicts --device cpu; for CPU ranks use: torchrun --nproc-per-node 2"),
    (["--gpus", "2"], {"WORLD_SIZE": "2"}, "under torchrun, drop --gpus"),
])
def test_gpus_refusals_are_one_readable_line(extra, env, message, tiny_folder, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli_main(["train", "--data", str(tiny_folder), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_gpus_relaunches_the_same_flags_under_torchrun_without_itself():
    argv = ["-v", "train", "--data", "photos dir", "--gpus", "4", "--lr", "3e-4", "--no-amp", "--sync-bn",
            "--name=-odd-name", "--config", "c.yaml", "--local-sgd-period", "4"]
    args = build_parser().parse_args(argv)
    cmd = torchrun_command(args, 4)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "-m", "tuneserve"]
    assert cmd[: len(launcher)] == launcher
    assert not any(a.startswith("--gpu") for a in cmd)
    child = build_parser().parse_args(cmd[len(launcher):])
    assert child.command == "train" and child.verbose and child.gpus is None and child.config == "c.yaml"
    for name in ("data", "lr", "amp", "sync_bn", "name", "local_sgd_period", "epochs", "resume"):
        assert getattr(child, name) == getattr(args, name), name  # unset flags stay unset (None): the file decides
    assert child.device == "cuda"


# The one-process fine-tune both tests below judge: real photos (16 + 10 a class, one bee fewer in each split, so
# 31 training and 19 validation photos: odd counts, whose rank shards need padding), effective batch 8.
ONE_RANK = dict(epochs=3, head_epochs=2, loader_workers=0, lr=2e-3, device="cpu",  # CPU ranks on a CUDA host too
                image_size=128)  # a third of 224 px's compute; ants and bees still part at once


@pytest.fixture(scope="module")
def one_rank(hymenoptera, tmp_path_factory):
    """(photos folder, TrainResult): the fine-tune in one process, registered as "hym-one-rank" with its INT8
    variant (calibrated on the training photos, gated on the validation photos)."""
    tmp = tmp_path_factory.mktemp("one-rank")
    subset = hymenoptera_subset(hymenoptera, tmp / "hym", train=16, val=10)
    for split in ("train", "val"):
        sorted((subset / split / "bees").iterdir())[-1].unlink()
    result = train(TrainConfig(data=str(subset), batch_size=8, output_dir=str(tmp / "runs"), name="hym-one-rank",
                               exporter=QUICK_EXPORT["exporter"], diagnostics=False, **ONE_RANK))
    return subset, result


@pytest.mark.slow
def test_a_real_photos_fine_tune_is_served_as_it_was_validated(one_rank, capsys):
    """The registered ONNX model, evaluated through the serving runtime and preprocessing, reproduces training's
    own validation numbers; its INT8 variant was calibrated and gated on the photos the run had."""
    subset, result = one_rank
    # On the CPU: training validates in fp32 there, as the served graph computes; on CUDA it validates under
    # bf16 autocast, which moves the loss by more than the 1e-3 compared below.
    assert result.best_metrics["top1"] >= 0.8  # ImageNet features separate ants from bees almost at once
    served = evaluate_stored(load_model(result.model.tag), str(subset))
    assert served["confusion"] == result.best_metrics["confusion"]
    assert served["loss"] == pytest.approx(result.best_metrics["loss"], abs=1e-3)
    int8 = result.model.card.variants["int8"]
    assert int8["calibration_images"] == 31 and int8["images"] == 19 and int8["kept"] == (int8["top1_agreement"] >= 0.99)
    assert (result.model.path / "model.int8.onnx").is_file() == int8["kept"]
    assert cli_main(["evaluate", result.model.tag, "--data", str(subset)]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {result.best_metrics['top1']:.2%}" in out and "ants" in out
    assert cli_main(["models"]) == 0
    assert result.model.tag in capsys.readouterr().out


@pytest.mark.slow
def test_two_cpu_ranks_register_a_model_as_good_as_one(one_rank, tmp_path):
    """The same fine-tune (effective batch 8, same lr and schedule) as 1 process x batch 8 and as `torchrun
    --nproc-per-node 2 ... tuneserve train` x batch 4: both register a model, of the same validation quality.
    Under torchrun: gloo on CPU, every validation image counted once, rank 0 alone writes, and the run starts
    from a folder whose own `models`/`service`/`training` packages must not be imported."""
    subset, _ = one_rank
    project = shadowing_packages(tmp_path / "project")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "tuneserve", "train",
         "--data", str(subset), "--batch-size", "4", "--output-dir", str(tmp_path / "two"), "--name", "hym-two-ranks",
         *cli_flags(ONE_RANK), *QUICK_EXPORT_FLAGS, "--no-diagnostics"],
        capture_output=True, text=True, timeout=300, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1
    (run,) = (tmp_path / "two").iterdir()
    history = json.loads((run / "history.json").read_text())
    assert [int(np.array(h["val"]["confusion"]).sum()) for h in history] == [19, 19, 19]  # not 2 x 10, padded
    assert history[0]["train_images"] == 32  # 31 training photos, padded to 16 per rank by DistributedSampler
    a, b = load_model("hym-one-rank").card.metrics, load_model("hym-two-ranks").card.metrics
    assert a["val_images"] == b["val_images"] == 19
    assert min(a["val_top1"], b["val_top1"]) >= 0.8
    assert abs(a["val_top1"] - b["val_top1"]) <= 2 / 19 + 1e-9  # 2 images
    assert abs(a["val_loss"] - b["val_loss"]) <= 0.05

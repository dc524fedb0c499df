"""`train(cfg)`: check the data, train the new head, then everything for as long as validation improves
(training/schedule.py), keep the best epoch, export it to ONNX, register it.

Runs as one process or as one rank of `torchrun` (DDP). Rank 0 alone logs, writes checkpoints, metrics and
plots, and exports; every rank trains and evaluates its shard. Each epoch starts from RNG seeds derived from
(seed, epoch, rank), and `last.pt` (written atomically at every epoch's end) holds model, optimizer,
scheduler, scaler, history and RNG state, so a resumed run continues exactly where the interrupted one was.
With `local_sgd_period` K > 0 ranks step on their own and average parameters every K steps (see LocalSGD), and
once more at every epoch's end, so evaluation and checkpoints always see the one averaged model.
With `ema`, an AveragedModel of the unwrapped model is updated after every optimizer step on every rank, takes
rank 0's state at each epoch's end, and is what is evaluated for the best epoch, checkpointed and exported.
With `compile`, the steps run a torch.compile'd view of the model (wrapped in DDP after compiling, as torch
advises); evaluation, checkpoints and export use the model itself.
With `shard` "fsdp" under torchrun, the model (and EMA) is sharded in place with FSDP2 instead of wrapped in DDP
(training/sharding.py); checkpoints are the full state dicts, gathered by every rank at each epoch's end.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
import torch.nn as nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from tuneserve.models.architectures import get_architecture
from tuneserve.models.preprocessing import Preprocessing
from tuneserve.models.store import StoredModel, validate_name
from tuneserve.models.weights import build_model, continue_from, head_parameters
from tuneserve.training import checkpoint as ckpt_io
from tuneserve.training.config import IMBALANCE_RATIO, TrainConfig, upgrade_saved_config
from tuneserve.training.compilation import check_compile, compiled
from tuneserve.training.data import Dataset, discover
from tuneserve.training.diagnostics import after_training
from tuneserve.training.ema import make_ema, resolve_decay
from tuneserve.training.loaders import eval_loader, make_loaders
from tuneserve.training.distributed import (DistEnv, LocalSGD, barrier, broadcast_from_rank0, cleanup, make_local_sgd,
                                            setup)
from tuneserve.training.sharding import (EvenBatches, FullStateTrainables, is_sharded, replicated, shard_model,
                                         update_ema)
from tuneserve.training.export import export_checkpoint, load_weights
from tuneserve.training.head_probe import fit_head
from tuneserve.training.loop import batch_mixer, evaluate, train_one_epoch
from tuneserve.training.metrics import write_history, write_report
from tuneserve.training.progress import Progress
from tuneserve.training.schedule import Adaptive, fixed_factor
from tuneserve.training.tracking import Trackers, check_installed, open_trackers, parse_report_to
from tuneserve.training.plots import plot_confusion, plot_curves

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model: StoredModel | None = None
    stopped_early: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run a whole fine-tuning job. `on_epoch_end(epoch, row)` is called on rank 0 after each checkpoint."""
    env = setup(cfg.device)
    try:
        return _train(cfg, env, on_epoch_end)
    finally:
        cleanup(env)


def _train(cfg: TrainConfig, env: DistEnv, on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    run_started = time.perf_counter()  # a time budget counts everything: data checks and the head's fit included
    resume = ckpt_io.load(cfg.resume) if cfg.resume else None
    if resume is not None:
        cfg = _resumed_config(cfg, resume)
    parent = None
    if cfg.init_from and resume is None:
        cfg, parent = _with_parent(cfg)
    _check_distributed(cfg, env)
    reporters = parse_report_to(cfg.report_to)  # before anything slow: a bad value or a missing library
    check_installed(reporters)
    if cfg.compile:
        check_compile(env.device, cfg.compile_backend)
    name = validate_name(cfg.model_name())
    arch = get_architecture(cfg.arch)
    pp = _preprocessing(parent.card.preprocessing if parent is not None else arch.preprocessing, cfg.image_size)

    ds = discover(cfg.data, cfg.manifest, cfg.val_fraction, cfg.seed, cfg.min_images_per_class)
    if resume is not None and resume["classes"] != ds.classes:
        raise ValueError(f"cannot resume: the checkpoint's classes {resume['classes']} differ from the data's {ds.classes}")
    if env.is_main:
        log.info("data: %s | %d classes | %d train, %d val images | %d skipped",
                 ds.layout, len(ds.classes), len(ds.train), len(ds.val), len(ds.skipped))

    _seed_everything(cfg.seed, 0, env.rank)  # the new head's initialisation depends on the seed only
    if parent is not None:
        model, kept = continue_from(cfg.arch, load_weights(parent), parent.card.labels, ds.classes)
        if env.is_main:
            log.info("continuing from %s: %d of its %d classes kept, %d new", parent.tag, kept,
                     len(parent.card.labels), len(ds.classes) - kept)
    else:
        model = build_model(cfg.arch, len(ds.classes), cfg.weights)
    model = model.to(env.device)
    run_dir = Path(resume["run_dir"]) if resume is not None else _new_run_dir(cfg, name, env)
    if env.is_main:
        # The effective configuration, as a file `tuneserve train --config` takes.
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    trackers = open_trackers(reporters, run_dir, name, cfg.to_dict(), cfg.tracking_uri) if env.is_main else Trackers([])
    channels_last = cfg.channels_last and env.device.type == "cuda"
    if env.device.type == "cuda":
        # Every training batch has one shape (input_size crops, drop_last), and validation adds one more for
        # its last batch: cuDNN's per-shape algorithm search pays for itself in the first steps.
        torch.backends.cudnn.benchmark = True
    sharded = cfg.shard == "fsdp" and env.distributed
    if cfg.shard == "fsdp" and not sharded and env.is_main:
        log.info("--shard fsdp: one process has nothing to shard across; training unsharded (same checkpoints)")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # shard_model takes it as it is (training/sharding.py)
    if cfg.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp_dtype = _amp_dtype(cfg, env)
    train_loader, val_loader, train_sampler = make_loaders(ds, pp, cfg, env)
    steps_per_epoch = -(-len(train_loader) // cfg.grad_accum_steps)
    weights = _class_weights(ds, cfg, env)
    probed, probe_row, probe_weights = None, None, None
    if resume is None and cfg.fits_probe():
        # Before the EMA copies the model and FSDP shards it: the head is a plain nn.Linear on every rank here.
        # No RNG drawn here matters: every epoch reseeds, and the new head was initialised above.
        head_module = model.get_submodule(arch.head)
        new_head = {k: v.clone() for k, v in head_module.state_dict().items()}
        probed = fit_head(model, arch.head, eval_loader(ds.train, pp, cfg, env), env, len(ds.classes),
                          weights, cfg.label_smoothing, cfg.seed, channels_last)
        broadcast_from_rank0(head_parameters(model, cfg.arch), env)
        if cfg.probe_candidate:
            val0 = evaluate(model, val_loader, env, amp_dtype, channels_last, ds.classes, desc="val (probe)")
            probe_row = {"epoch": 0, "phase": "probe", "probe_head": probed, "val": val0,
                         **{f"val_{k}": v for k, v in val0.items() if k in ("loss", "top1", "top5", "macro_f1")}}
            probe_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if env.is_main else None
            if env.is_main:
                log.info("linear probe (frozen backbone, fitted head): val loss %.4f top-1 %.3f: the model to beat",
                         val0["loss"], val0["top1"])
        if not cfg.probe_head:
            head_module.load_state_dict(new_head)  # the recipe's own head phase starts from the new head
    length = cfg.epochs or cfg.max_epochs  # the most epochs this run can take
    # The EMA copies the model before sharding and is sharded the same way (its updates pair the shards).
    ema = _make_ema(model, cfg, steps_per_epoch * length, env) if cfg.ema else None
    if sharded:
        # in place; before the optimizer, which must hold the sharded parameters
        shard_model(model, env, mixed_precision=amp_dtype)
        if ema is not None:
            shard_model(ema.module, env, mixed_precision=amp_dtype)
        val_loader = EvenBatches(val_loader, pp.input_size, env)

    head = set(id(p) for p in head_parameters(model, cfg.arch))
    optimizer = torch.optim.AdamW(_param_groups(model, head, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    adaptive = None if cfg.epochs else Adaptive(steps_per_epoch, cfg.head_epochs, cfg.warmup_epochs, cfg.patience,
                                                cfg.max_epochs, cfg.time_budget_seconds())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, adaptive.factor if adaptive else functools.partial(
        fixed_factor, steps_per_epoch=steps_per_epoch, head_epochs=cfg.head_epochs, epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs))
    # fp16: a rank sees only its gradient shards, so whether to skip a step must be agreed on (all-reduced).
    scaler_type = ShardedGradScaler if sharded else torch.amp.GradScaler
    scaler = scaler_type(env.device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    mixer = batch_mixer(len(ds.classes), cfg.mixup, cfg.cutmix)

    # --shard fsdp checkpoints hold full state dicts and name-keyed optimizer states, whatever the world size.
    trainables = (FullStateTrainables if cfg.shard == "fsdp" else ckpt_io.Trainables)(model, optimizer, scheduler,
                                                                                      scaler, ema)
    progress = Progress()
    if resume is not None:
        trainables.load(resume)
        progress = Progress.from_checkpoint(resume)
        ckpt_io.set_rng_state(resume["rng"])
        if adaptive is not None:
            adaptive.restore(progress.history)
        if env.is_main:
            log.info("resumed %s after epoch %d", run_dir, progress.epoch)
    run_meta = ckpt_io.RunMeta(arch=cfg.arch, classes=ds.classes, preprocessing=pp.to_dict(), config=cfg.to_dict(),
                               run_dir=str(run_dir))
    if probe_row is not None:
        progress.offer_probe(probe_row)
        if env.is_main:  # best.pt until an epoch beats it
            ckpt_io.save_atomic({**dataclasses.asdict(run_meta), "epoch": 0, "model": probe_weights,
                                 "metrics": probe_row["val"]}, run_dir / "best.pt")
        probe_weights = None
    if env.is_main and env.distributed:
        log.info("%s: %d ranks x batch %d x %d accumulation step(s) = effective batch %d; lr %g as given",
                 "FSDP (sharded)" if sharded else "DDP", env.world_size, cfg.batch_size, cfg.grad_accum_steps,
                 env.world_size * cfg.batch_size * cfg.grad_accum_steps, cfg.lr)
    # scheduler.last_epoch counts optimizer steps taken so far (resumed runs included).
    local_sgd = make_local_sgd(cfg.local_sgd_period, cfg.local_sgd_warmup_steps, cfg.local_sgd_intra_node,
                               scheduler.last_epoch, env)
    after_step = _after_step(model, optimizer, local_sgd, ema)
    step_module = compiled(model, cfg.compile_backend) if cfg.compile else model

    stopped_early = False
    ddp_model: nn.Module = model
    phase = None
    if env.is_main and adaptive is not None:
        log.info("schedule: adaptive, %d optimizer steps an epoch: a first cycle of %d epochs, then shorter ones "
                 "while validation still improves at the end of the last; at most %d epochs%s", steps_per_epoch,
                 cfg.first_cycle_epochs(), cfg.max_epochs, f", within {cfg.time_budget}" if cfg.time_budget else "")
    started = run_started - (progress.history[-1].get("elapsed_s", 0.0) if progress.history else 0.0)
    epochs_bar = tqdm(range(progress.epoch, length), desc="epochs", unit="epoch", disable=None if env.is_main else True,
                      initial=progress.epoch, total=length)
    for epoch in epochs_bar:
        epoch_started = time.perf_counter()
        new_phase = "head" if epoch < cfg.head_epochs else "full"
        if new_phase != phase:
            phase = new_phase
            ddp_model = _prepare_phase(model, head, phase, env, local_sgd, step_module)
        _seed_everything(cfg.seed, epoch + 1, env.rank)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        _set_train_mode(model, head, phase)
        lr_now = optimizer.param_groups[-1]["lr"]
        stats = train_one_epoch(
            ddp_model, train_loader, optimizer, scheduler, scaler, criterion, env, amp_dtype, channels_last,
            cfg.grad_accum_steps, cfg.grad_clip, desc=f"epoch {epoch + 1}/{length} ({phase})", after_step=after_step,
            on_step=trackers.step if trackers else None, mixer=mixer,
        )
        if local_sgd is not None:
            local_sgd.average_now(p for p in model.parameters() if p.requires_grad)
        _sync_buffers(model, env)
        if ema is not None:  # sharded: the parameters agree by construction, only buffers can differ
            broadcast_from_rank0(replicated(ema) if sharded else ema.state_dict().values(), env)
        val, live = _validate(model, ema, val_loader, env, amp_dtype, channels_last, ds.classes)
        row = {"epoch": epoch + 1, "phase": phase, "lr": lr_now, **stats,
               **{f"val_{k}": v for k, v in val.items() if k in ("loss", "top1", "top5", "macro_f1")},
               **live, "val": val}
        stop, why = False, ""
        if adaptive is not None:
            # Every rank decides from the same history; the time budget from rank 0's clock, broadcast.
            elapsed = _agreed(time.perf_counter() - started, env)
            stop, why = adaptive.after_epoch([*progress.history, row], scheduler.last_epoch, elapsed,
                                             _agreed(time.perf_counter() - epoch_started, env))
            row.update(adaptive.state(), elapsed_s=elapsed, **({"schedule": why} if why else {}))
        if probed is not None and epoch == 0:  # what the probe fitted, and (as a candidate) scored
            row["probe_head"] = {**probed, **({"val_top1": probe_row["val_top1"], "val_loss": probe_row["val_loss"]}
                                              if probe_row is not None else {})}
        improved = progress.record(row)
        epochs_bar.set_postfix(val_top1=f"{val['top1']:.3f}", best=f"{progress.best_top1:.3f}")
        trainables.gather()  # collective with --shard fsdp: every rank takes part, rank 0 keeps the full state
        if env.is_main:
            log.info("epoch %d/%d %s: train loss %.4f top-1 %.3f | val loss %.4f top-1 %.3f%s%s | %.0f img/s%s",
                     epoch + 1, length, phase, stats["train_loss"], stats["train_top1"], val["loss"], val["top1"],
                     f" top-5 {val['top5']:.3f}" if "top5" in val else "",
                     f" (EMA; live model: loss {live['live_val_loss']:.4f} top-1 {live['live_val_top1']:.3f})"
                     if live else "", stats["images_per_s"], " *best*" if improved else "")
            _save_epoch(run_dir, run_meta, trainables, progress, improved)
            if trackers:
                plot_confusion(val["confusion"], ds.classes, run_dir / "confusion_epoch.png")
                trackers.epoch(epoch + 1, row, run_dir / "confusion_epoch.png")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
        if why and env.is_main:
            log.info("schedule: %s", why)
            with (run_dir / "config.yaml").open("a") as f:  # YAML comments: the file stays a valid --config
                f.write(f"# schedule, epoch {epoch + 1}: {why}\n")
        if stop:
            stopped_early = epoch + 1 < length
            break
        if adaptive is None and cfg.patience and progress.since_best >= cfg.patience and epoch + 1 >= cfg.head_epochs:
            stopped_early = epoch + 1 < cfg.epochs
            if env.is_main and stopped_early:
                log.info("early stop: no validation top-1 gain for %d epochs", cfg.patience)
            break

    best_row = progress.best_row
    result = TrainResult(run_dir, progress.best_epoch, best_row["val"], progress.history, None, stopped_early, ds.skipped)
    if env.is_main:
        write_report(best_row["val"], ds.classes, run_dir)
        plot_confusion(best_row["val"]["confusion"], ds.classes, run_dir / "confusion_matrix.png")
        if cfg.export:
            result.model = export_checkpoint(run_dir / "best.pt", name, ds, cfg)
        if cfg.diagnostics:  # top_losses.png, label_issues.csv/.png, before the trackers take the files
            after_training(run_dir / "best.pt", ds.classes, ds.train, ds.val, env.device, cfg.batch_size,
                           cfg.effective_loader_workers(1), cfg.seed)
        trackers.finish(best_row["val"], run_dir, result.model.path if result.model else None)
    barrier(env)
    return result


def _agreed(value: float, env: DistEnv) -> float:
    """rank 0's `value` on every rank (the schedule's decisions must agree)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    torch.distributed.broadcast(t, src=0)
    return float(t.item())


def _preprocessing(pp: Preprocessing, image_size: int) -> Preprocessing:
    """The weights' own preprocessing (as they were trained), at `image_size` when one is set: the resize before
    the centre crop scales with it (224 of 256 stays 7/8)."""
    if not image_size or image_size == pp.input_size:
        return pp
    return dataclasses.replace(pp, input_size=image_size, resize_size=round(image_size * pp.resize_size / pp.input_size))


def _with_parent(cfg: TrainConfig) -> tuple[TrainConfig, StoredModel]:
    """The config continuing from the registered model `cfg.init_from`: its exact tag (recorded in the new
    model's card), its architecture (an explicit different --arch is an error) and, unless --name says
    otherwise, its name."""
    from tuneserve.models.store import load_model

    parent = load_model(cfg.init_from)
    if cfg.arch not in (parent.card.arch, TrainConfig.arch):
        raise ValueError(f"--init-from {parent.tag} is a {parent.card.arch} model; --arch {cfg.arch} cannot continue "
                         f"from it (leave --arch out)")
    # Same name by default: the result is the parent's next version (which poll mode serves once registered).
    return dataclasses.replace(cfg, init_from=parent.tag, arch=parent.card.arch, name=cfg.name or parent.name), parent


def _resumed_config(cfg: TrainConfig, resume: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config wins (same data, model and schedule), except where to run and whether to
    export; `epochs` too when it was changed from the default (to extend a finished run)."""
    saved = upgrade_saved_config(resume["config"])
    saved.update(resume=cfg.resume, export=cfg.export, device=cfg.device, loader_workers=cfg.loader_workers)
    if cfg.epochs != TrainConfig.epochs:
        saved["epochs"] = cfg.epochs
    return TrainConfig(**saved)


def _new_run_dir(cfg: TrainConfig, name: str, env: DistEnv) -> Path:
    # Every rank derives the same folder name; only rank 0 creates it.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / f"{name}-{stamp}"
    if env.is_main:
        suffix = 1
        base = run_dir
        while run_dir.exists():
            suffix += 1
            run_dir = base.with_name(f"{base.name}-{suffix}")
        run_dir.mkdir(parents=True)
    return run_dir


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = seed * 1_000_003 + epoch * 1_009 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _amp_dtype(cfg: TrainConfig, env: DistEnv) -> torch.dtype | None:
    if not cfg.amp or env.device.type != "cuda":
        return None  # CPU: fp32 (bf16 autocast on CPU is slower than fp32 on most CPUs, and less accurate)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _param_groups(model: nn.Module, head: set[int], cfg: TrainConfig) -> list[dict[str, Any]]:
    """Head and backbone at their own learning rates; no weight decay on biases and norm layers (1-D params)."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        key = ("head" if id(p) in head else "backbone", p.ndim > 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):  # backbone groups first, head last
        lr = cfg.lr * (cfg.backbone_lr_mult if part == "backbone" else 1.0)
        out.append({"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '_no_decay'}"})
    return out


def _class_weights(ds: Dataset, cfg: TrainConfig, env: DistEnv) -> torch.Tensor | None:
    weights = class_weights(ds.counts("train"), cfg.class_weighting)
    if weights is None:
        return None
    if env.is_main:
        log.info("class weighting %s: loss weights %s", cfg.class_weighting,
                 ", ".join(f"{c} {w:.2f}" for c, w in zip(ds.classes, weights.tolist())))
    return weights.to(env.device)


def class_weights(counts: list[int], weighting: str) -> torch.Tensor | None:
    """float32 (classes,) loss weights for training photo `counts`, averaging 1 over the photos; None for none
    (and for auto on data whose largest class has under IMBALANCE_RATIO x the smallest's photos; above it, auto
    is sqrt)."""
    if weighting == "auto":
        weighting = "sqrt" if max(counts) >= IMBALANCE_RATIO * min(counts) else "none"
    if weighting == "none":
        return None
    n = torch.tensor(counts, dtype=torch.float32)
    w = n.sum() / (len(n) * n)  # inverse frequency: each class's photos weigh 1/classes of the loss in total
    if weighting == "sqrt":
        w = w.sqrt()
    # Mean 1 over the photos: with soft targets (MixUp) the loss is divided by the batch size, not by the sum
    # of the weights, so their scale would otherwise change the step size.
    return w * n.sum() / (w * n).sum()


def _prepare_phase(model: nn.Module, head: set[int], phase: str, env: DistEnv, local_sgd: LocalSGD | None = None,
                   step_module: nn.Module | None = None) -> nn.Module:
    """Freeze the backbone for the head phase; wrap in DDP anew, since DDP fixes its trainable set when built.
    `step_module` is what the training steps run: `model` itself, or a compiled view sharing its parameters."""
    for p in model.parameters():
        p.requires_grad_(phase == "full" or id(p) in head)
    step_module = model if step_module is None else step_module
    if not env.distributed or is_sharded(model):  # FSDP2 is data-parallel already, and shards per parameter
        return step_module
    ddp = DDP(step_module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if local_sgd is not None:
        local_sgd.attach(ddp)
    return ddp


def _check_distributed(cfg: TrainConfig, env: DistEnv) -> None:
    """Refuse, before any work, what would only fail at the first full-phase step."""
    if cfg.sync_bn and env.distributed and env.device.type != "cuda":
        raise ValueError("sync_bn needs CUDA ranks: torch's SyncBatchNorm does not run on CPU (gloo) ranks; "
                         "drop --sync-bn there")


def _make_ema(model: nn.Module, cfg: TrainConfig, total_steps: int, env: DistEnv) -> AveragedModel:
    decay = resolve_decay(cfg.ema_decay, total_steps)
    if env.is_main:
        log.info("weight EMA: decay %.6g per optimizer step (%d steps in the run)", decay, total_steps)
    return make_ema(model, decay)


def _after_step(model: nn.Module, optimizer: torch.optim.Optimizer, local_sgd: LocalSGD | None,
                ema: AveragedModel | None) -> Callable[[], None] | None:
    """What runs after every optimizer step: local SGD's averaging first, so that the EMA averages the weights
    every rank continues from."""
    hooks = []
    if local_sgd is not None:
        hooks.append(functools.partial(local_sgd.after_step, optimizer.param_groups))
    if ema is not None:
        hooks.append(functools.partial(update_ema, ema, model) if is_sharded(model) else
                     functools.partial(ema.update_parameters, model))
    if not hooks:
        return None

    def run() -> None:
        for hook in hooks:
            hook()

    return run


def _validate(model: nn.Module, ema: AveragedModel | None, loader: Any, env: DistEnv, amp_dtype: torch.dtype | None,
              channels_last: bool, classes: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """(the metrics that pick the best epoch, extra row fields): the model's; with an EMA, the EMA's, and the
    live model's loss and top-1 beside them, to show what averaging gained."""
    val = evaluate(model, loader, env, amp_dtype, channels_last, classes)
    if ema is None:
        return val, {}
    live = {"live_val_loss": val["loss"], "live_val_top1": val["top1"]}
    return evaluate(ema.module, loader, env, amp_dtype, channels_last, classes, desc="val (EMA)"), live


def _set_train_mode(model: nn.Module, head: set[int], phase: str) -> None:
    """Full phase: all train(). Head phase: backbone in eval() so BatchNorm keeps its ImageNet statistics."""
    if phase == "full":
        model.train()
        return
    model.eval()
    for m in model.modules():
        if any(id(p) in head for p in m.parameters(recurse=False)):
            m.train()


def _sync_buffers(model: nn.Module, env: DistEnv) -> None:
    """Ranks' BatchNorm running statistics drift apart after their last local batch; take rank 0's."""
    broadcast_from_rank0(model.buffers(), env)


def _save_epoch(run_dir: Path, meta: ckpt_io.RunMeta, trainables: ckpt_io.Trainables, progress: Progress,
                improved: bool) -> None:
    """last.pt (everything to resume), best.pt when this epoch is the best, the history files and curves."""
    ckpt_io.save_epoch(run_dir, meta, trainables, progress, improved)
    write_history(progress.history, run_dir)
    plot_curves(progress.history, run_dir / "curves.png")

"""One epoch of training and one pass of evaluation. Tensors: images float32 (B, 3, S, S), labels int64 (B,)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tuneserve.training.tracking import LOG_EVERY
from tuneserve.training.distributed import DistEnv, all_reduce_sum
from tuneserve.training.metrics import TOP_K, reports_top_k, summarize


def batch_mixer(num_classes: int, mixup: float, cutmix: float) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """MixUp and/or CutMix for a training batch (torchvision.transforms.v2): (x (B,3,H,W) float, y (B,) int64)
    -> (mixed x, soft targets (B, classes) float); None when both are off. With both, one of the two per batch."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from torchvision.transforms import v2

    chosen = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    env: DistEnv,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    grad_accum_steps: int,
    grad_clip: float,
    desc: str,
    after_step: Callable[[], None] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    mixer: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
) -> dict[str, Any]:
    """model is already in the right train/eval mode for its phase; returns train loss/top-1 over all ranks.

    `after_step()` runs after every optimizer step, while the gradients are still there (local SGD averages
    the parameters that have one). `on_step(step, loss, lr)` is told every LOG_EVERY optimizer steps (the
    scheduler's step count, this micro-batch's loss, the head's learning rate), for experiment tracking. The loss is a mean over the local batch, so DDP's gradient *average* over
    ranks equals the gradient of the mean over all ranks' images: W ranks x batch B step like 1 x batch W*B."""
    device = env.device
    n_batches = len(loader)  # type: ignore[arg-type]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=None if env.is_main else True, unit="batch")
    for i, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        y = y.to(device, non_blocking=True)
        step_now = (i + 1) % grad_accum_steps == 0 or i + 1 == n_batches
        # Skip DDP's gradient all-reduce on accumulation micro-steps: it only needs to happen once per step.
        sync = contextlib.nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync()
        # MixUp/CutMix: the loss sees soft targets (B, C); training top-1 still counts the batch's own labels.
        x, target = mixer(x, y) if mixer is not None else (x, y)
        with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)  # (B, C)
            loss = criterion(logits.float(), target)
        scaler.scale(loss / grad_accum_steps).backward()
        if step_now:
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if after_step is not None:
                after_step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if on_step is not None and scheduler.last_epoch % LOG_EVERY == 0:
                on_step(scheduler.last_epoch, loss.item(), optimizer.param_groups[-1]["lr"])
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if env.is_main and i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    totals = all_reduce_sum(torch.stack([loss_sum, correct.double(), seen.double()]), env)
    elapsed = time.perf_counter() - start
    n = max(int(totals[2].item()), 1)
    return {"train_loss": totals[0].item() / n, "train_top1": totals[1].item() / n, "train_images": n,
            "seconds": elapsed, "images_per_s": n / elapsed}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, env: DistEnv, amp_dtype: torch.dtype | None, channels_last: bool,
    classes: list[str], desc: str = "val",
) -> dict[str, Any]:
    """Every rank evaluates its own shard with the *unwrapped* model (a DDP forward on only some ranks can
    hang), then the confusion matrix, loss and top-5 counts are summed across ranks: exact, not averaged."""
    model.eval()
    c = len(classes)
    device = env.device
    confusion = torch.zeros(c * c, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=None if env.is_main else True, unit="batch"):
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float()  # (B, C)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * c + logits.argmax(1), minlength=c * c)
        if reports_top_k(c):
            top5 += (logits.topk(TOP_K, dim=1).indices == y[:, None]).any(dim=1).sum()
    all_reduce_sum(confusion, env)
    all_reduce_sum(loss_sum, env)
    all_reduce_sum(top5, env)
    cm = confusion.view(c, c).cpu().numpy().astype(np.int64)
    return summarize(cm, loss_sum.item(), int(top5.item()) if reports_top_k(c) else None, classes)

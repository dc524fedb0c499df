"""The new head fitted before fine-tuning, as a logistic regression on the frozen backbone's features (LP-FT).

Kumar et al. 2022 ("Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution"): a
random head's large early gradients move the pretrained features before the head has learnt anything; a head
fitted first (linear probing), then fine-tuning everything, does better in and out of distribution. Fitting it
in closed form replaces the head-only epochs: one forward pass over the training photos (no augmentation, no
backward: about a third of an epoch's compute) and a few seconds of L-BFGS, where two head-only epochs cost
~0.8 of an epoch and left the head answering the dominant class for every photo on a 72%-one-class set
(docs/benchmarks.md).

Features: float32 (N, D), the input of the architecture's final nn.Linear, the backbone in eval mode (ImageNet
BatchNorm statistics). Under DDP every rank computes its shard, all ranks gather them and fit the same head.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tuneserve.training.distributed import DistEnv

log = logging.getLogger(__name__)

# L2 strengths tried on a held-out fifth of the training photos (on standardised features); the one with the
# lowest held-out loss is refit on all of them.
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
LBFGS_ITERATIONS = 200


@torch.no_grad()
def frozen_features(model: nn.Module, head_path: str, loader: DataLoader, env: DistEnv,
                    channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D) on the CPU, labels int64 (N,)) of every photo `loader` gives, gathered from all
    ranks."""
    head = model.get_submodule(head_path)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].flatten(1).float().cpu()))
    labels = []
    was_training = model.training
    model.eval()
    try:
        for x, y in loader:
            x = x.to(env.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
            model(x)
            labels.append(y)
    finally:
        hook.remove()
        model.train(was_training)
    feats, ys = torch.cat(captured), torch.cat(labels).long()
    if env.distributed:
        parts: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(parts, (feats, ys))
        feats, ys = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return feats, ys


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, weight: torch.Tensor | None,
               smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS: x float64 (N, D), y int64 (N,) -> (W (C, D), b (C,))."""
    w = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe")
    wt = weight.to(x.dtype) if weight is not None else None

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, weight=wt, label_smoothing=smoothing) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_head(model: nn.Module, head_path: str, loader: DataLoader, env: DistEnv, classes: int,
             weight: torch.Tensor | None, smoothing: float, seed: int, channels_last: bool) -> dict[str, Any]:
    """Set the head (the nn.Linear at `head_path` in `model`) to the logistic regression fitted on the frozen features of `loader`'s photos
    (class `weight`s and label `smoothing` as the fine-tuning loss has them). Returns what was fitted, for the
    log and the run's record."""
    started = time.perf_counter()
    feats, ys = frozen_features(model, head_path, loader, env, channels_last)
    x = feats.double()
    # Centred per feature, scaled by one number: one L2 grid suits every backbone's feature scale. Not a scale per
    # feature: channels almost always 0 (ReLU6 after ImageNet training) would get weights of 1/their tiny spread,
    # and once the backbone trains (BatchNorm on batch statistics) move the logits by hundreds: a training loss of
    # 72 in the first epoch on greyscale steel photos (neu-surface-defect-dominant).
    mean, std = x.mean(0), x.std(0).mean().clamp_min(1e-6)
    x = (x - mean) / std
    cpu_weight = weight.cpu() if weight is not None else None
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(seed))
    hold, keep = order[: len(order) // 5], order[len(order) // 5:]

    def held_out_loss(l2: float) -> float:
        w, b = fit_linear(x[keep], ys[keep], classes, l2, cpu_weight, smoothing)
        return float(F.cross_entropy(x[hold] @ w.T + b, ys[hold]))

    l2 = min(L2_GRID, key=held_out_loss) if len(hold) >= classes else L2_GRID[-1]  # too few to choose: the strongest
    w, b = fit_linear(x, ys, classes, l2, cpu_weight, smoothing)
    train_top1 = float(((x @ w.T + b).argmax(1) == ys).double().mean())
    # Fold the standardisation into the layer: W (x - m) / s + b = (W / s) x + (b - W m / s).
    head = model.get_submodule(head_path)
    with torch.no_grad():
        head.weight.copy_((w / std).to(head.weight))
        head.bias.copy_((b - (w / std) @ mean).to(head.bias))
    fitted = {"photos": len(ys), "features": x.shape[1], "l2": l2, "train_top1": round(train_top1, 4),
              "seconds": round(time.perf_counter() - started, 1)}
    if env.is_main:
        log.info("head: logistic regression on the frozen features of %d training photos (L2 %g chosen on a held-out "
                 "fifth), training top-1 %.3f, %.1f s", fitted["photos"], l2, train_top1, fitted["seconds"])
    return fitted

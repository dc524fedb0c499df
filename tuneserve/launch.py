"""`tuneserve train --gpus N`: the same command relaunched under torchrun, one process per local GPU."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def check_gpus(n: int, device: str) -> None:
    """Refuse, naming the problem, what torchrun would only fail at later."""
    import torch

    if n < 1:
        raise ValueError(f"--gpus must be >= 1, got {n}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ValueError("--gpus launches torchrun itself; under torchrun, drop --gpus (torchrun already started the ranks)")
    if device == "cpu":
        raise ValueError(f"--gpus {n} runs one process per CUDA GPU, which contradicts --device cpu; for CPU ranks "
                         f"use: torchrun --nproc-per-node {n} -m tuneserve train ...")
    available = torch.cuda.device_count()
    if n > available:
        hint = f"; use --gpus 1..{available}" if available else " (no CUDA GPU, or a CPU-only torch build)"
        raise ValueError(f"--gpus {n} asks for {n} CUDA GPU(s), but torch sees {available}{hint}")


def torchrun_command(args: argparse.Namespace, n: int) -> list[str]:
    """`tuneserve train ... --gpus N` as `python -m torch.distributed.run --standalone --nproc-per-node N -m
    tuneserve train ...`, rebuilt from the parsed flags (so abbreviations and `--gpus` itself cannot leak)."""
    from tuneserve.training.config import TrainConfig

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "tuneserve"]
    if args.verbose:
        cmd.append("-v")
    cmd.append("train")
    if args.config is not None:
        cmd.append(f"--config={args.config}")
    for f in dataclasses.fields(TrainConfig):
        value = "cuda" if f.name == "device" else getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        else:
            cmd.append(f"{flag}={value}")  # '=' keeps values that start with '-' from reading as flags
    return cmd

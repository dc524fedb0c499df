"""Process-group plumbing for torchrun: one process per device, NCCL on CUDA, gloo on CPU; and local SGD.

Without torchrun's environment (WORLD_SIZE unset or 1) everything degrades to a single process, so the same
code path serves `tuneserve train` and `torchrun --nproc-per-node N -m tuneserve train` (multi-node too).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1  # ranks on this node (torchrun's --nproc-per-node)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device_preference: str) -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=30),  # export on rank 0 may take minutes while others wait
        )
    return DistEnv(rank, world_size, local_rank, device, local_world_size)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_rank0(tensors: Iterable[torch.Tensor], env: DistEnv) -> None:
    """Every rank's `tensors` replaced in place by rank 0's. Under no_grad: a broadcast into a parameter that
    requires grad is otherwise recorded by autograd, and every backward after it warns that c10d::broadcast_ has
    no autograd kernel."""
    if env.distributed:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, src=0)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class LocalSGD:
    """Post-local SGD (Lin et al., "Don't Use Large Mini-Batches, Use Local SGD", 2018) from torch.distributed's
    own pieces: the `post_localSGD_hook` DDP comm hook plus a `PeriodicModelAverager`.

    Optimizer steps 0 .. warmup-1 are plain DDP (the hook all-reduces gradients). From step `warmup` on the hook
    hands each rank its own gradients (or all-reduces them within the node only, `intra_node`), every rank steps
    on its own, and the averager all-reduces the *parameters* right after steps warmup, warmup+K, warmup+2K...
    Both counters count optimizer steps and start from `steps_done` (the scheduler's count), so they continue
    across the head -> full DDP re-wrap and across a resume. Optimizer state (AdamW moments) stays per rank.
    """

    def __init__(self, period: int, warmup_steps: int, steps_done: int, intra_node_group: Any = None):
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        self.period = period
        self.warmup_steps = warmup_steps
        # subgroup=None with post_local_gradient_allreduce=True would make the hook create per-node groups lazily,
        # inside backward; the group is created up front instead, or local gradients are used as they are.
        self.state = PostLocalSGDState(process_group=None, subgroup=intra_node_group, start_localSGD_iter=warmup_steps,
                                       post_local_gradient_allreduce=intra_node_group is not None)
        self.state.iter = steps_done
        self.averager = PeriodicModelAverager(period=period, warmup_steps=warmup_steps)
        self.averager.step = steps_done

    def attach(self, ddp_model: nn.Module) -> None:
        """Register the hook on a (new) DDP wrapper; the same state carries the step count over."""
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import post_localSGD_hook

        ddp_model.register_comm_hook(self.state, post_localSGD_hook)

    def after_step(self, param_groups: Iterable[dict[str, Any]]) -> None:
        """Call after every optimizer step and *before* zero_grad(set_to_none=True): the averager skips
        parameters whose .grad is None (frozen ones), so it must still see this step's gradients."""
        self.averager.average_parameters(param_groups)

    def average_now(self, params: Iterable[nn.Parameter]) -> None:
        """Average outside the period (at each epoch's end), so that every rank evaluates and rank 0
        checkpoints the one model that the ranks agree on."""
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        average_parameters(iter(list(params)), dist.group.WORLD)


def make_local_sgd(period: int, warmup_steps: int, intra_node: bool, steps_done: int, env: DistEnv) -> LocalSGD | None:
    """A LocalSGD for this run, or None for synchronous DDP (period 0, or a single process)."""
    if period == 0 or not env.distributed:
        if period and env.is_main:
            log.info("local SGD (period %d) ignored: a single process has nothing to average with", period)
        return None
    group = None
    if intra_node:
        if env.world_size % env.local_world_size:
            raise ValueError(f"local_sgd_intra_node needs the same number of ranks on every node; world size "
                             f"{env.world_size} is not a multiple of this node's {env.local_world_size}")
        if env.local_world_size == env.world_size and env.is_main:
            log.warning("local_sgd_intra_node on a single node all-reduces gradients across all ranks every step: "
                        "that is synchronous DDP plus redundant parameter averaging")
        group, _ = dist.new_subgroups(group_size=env.local_world_size)  # collective: every rank calls it
    if env.is_main:
        log.info("local SGD: %d synchronous steps, then parameters averaged every %d steps%s",
                 warmup_steps, period, " (gradients still all-reduced within each node)" if intra_node else "")
    return LocalSGD(period, warmup_steps, steps_done, group)

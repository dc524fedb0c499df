"""`--shard fsdp`: fully sharded data parallelism with torch's FSDP2 (`fully_shard`, one DTensor per parameter).

Each rank holds 1/W of every parameter, gradient and AdamW moment; a block's full weights exist only while it
runs (all-gathered before its forward and backward, freed after), and gradients are reduce-scattered instead of
all-reduced. What the rest of training sees is unchanged: the sharded module is the model (in place: same
module tree, same state-dict keys), freezing the backbone for the head phase is `requires_grad_` on its
parameters (FSDP2 shards per parameter, so no re-wrap), torch.nn.utils.clip_grad_norm_ takes the global norm
over the shards, and checkpoints hold full, unsharded state dicts (gathered by every rank, kept by rank 0), so
export, `--resume` and serving read the same files as with DDP.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from tuneserve.training import checkpoint as ckpt_io
from tuneserve.training.distributed import DistEnv, broadcast_from_rank0

log = logging.getLogger(__name__)

CONTAINERS = (nn.Sequential, nn.ModuleList)


def shard_plan(model: nn.Module) -> list[str]:
    """Names of the submodules that become their own FSDP unit (all-gathered one at a time); the root takes
    the rest (stem, final norm, head). A unit is each module with parameters listed in a plain nn.Sequential or
    nn.ModuleList: that is how torchvision and timm list their repeated blocks (ResNet bottlenecks, MBConv and
    ConvNeXt blocks, ViT encoder layers), each the size of "one layer" that FSDP must hold unsharded at a time.
    Subclasses of Sequential (torchvision's Conv2dNormActivation, RegNet's AnyStage) are units, not containers.
    A unit holding over a quarter of the parameters that lists repeated blocks itself (timm's ConvNeXt stages:
    ConvNeXt-XL's third holds 27 blocks, 230M of 350M parameters) gets those blocks as units inside it."""
    plan: list[str] = []
    total = _size(model)

    def visit(module: nn.Module, prefix: str) -> None:
        listed = type(module) in CONTAINERS
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if type(child) in CONTAINERS or not (listed and _size(child)):
                visit(child, f"{path}.")
                continue
            if _size(child) > total / 4 and any(_repeats(m) for m in child.modules()):
                visit(child, f"{path}.")  # inner units first: FSDP shards children before their parents
            plan.append(path)

    visit(model, "")
    return plan


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _repeats(module: nn.Module) -> bool:
    """A plain container listing several blocks of one class (not a conv and its norm)."""
    if type(module) not in CONTAINERS:
        return False
    kinds = [type(c) for c in module.children() if _size(c)]
    return len(kinds) > len(set(kinds))


def mixed_precision_policy(amp_dtype: torch.dtype | None) -> Any:
    """FSDP2's policy for training under `amp_dtype` autocast: with bf16, the all-gathered parameters are bf16
    (half the bytes of every all-gather, and the dtype autocast would cast them to anyway) while gradients are
    reduce-scattered and kept in fp32, so that sharded AdamW steps on fp32 master weights as DDP's does. fp16
    (GPUs without bf16) and fp32 keep the default: fp32 parameters, cast by autocast, under the GradScaler."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if amp_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, env: DistEnv, mixed_precision: torch.dtype | None = None) -> nn.Module:
    """Apply fully_shard to the units of `shard_plan`, then to the root, over all ranks; in place (also
    returned). Call before building the optimizer: the parameters become new DTensor parameters.
    `mixed_precision`: the run's autocast dtype (None: fp32), see mixed_precision_policy.
    A channels_last model is accepted: FSDP2 shards contiguous parameters only, so its weights are made
    contiguous (NCHW) first; channels_last inputs still select cuDNN's NHWC kernels (a convolution runs NHWC
    when its input or its weight is channels_last), and the all-gathered weights are converted per call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(not p.is_contiguous() for p in model.parameters()):
        model.to(memory_format=torch.contiguous_format)  # in place for nn.Module: parameters' data replaced
    policy = mixed_precision_policy(mixed_precision)
    mesh = init_device_mesh(env.device.type, (env.world_size,))  # gloo on CPU ranks, NCCL on CUDA
    # Every rank starts from rank 0's weights, as DDP's constructor makes it: the ranks' fresh heads differ
    # (their seeds include the rank), and each rank would otherwise keep its own rows of the head.
    broadcast_from_rank0(model.state_dict().values(), env)
    plan = shard_plan(model)
    log.debug("FSDP units (then the root): %s", ", ".join(plan))
    for name in plan:
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor -> this rank's shard


@torch.no_grad()
def update_ema(ema: AveragedModel, model: nn.Module) -> None:
    """AveragedModel.update_parameters (use_buffers=True) on each rank's shards, for an EMA sharded like `model`.
    torch's own groups the parameters (DTensors) with the float buffers (plain tensors) into one foreach call,
    which DTensor refuses ("got mixed torch.Tensor and DTensor")."""
    ours = [_local(t) for t in itertools.chain(ema.module.parameters(), ema.module.buffers())]
    theirs = [_local(t).detach() for t in itertools.chain(model.parameters(), model.buffers())]
    if ema.n_averaged == 0:
        torch._foreach_copy_(ours, theirs)
    else:
        groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for a, b in zip(ours, theirs, strict=True):
            pair = groups.setdefault(a.dtype, ([], []))
            pair[0].append(a)
            pair[1].append(b)
        for averaged, current in groups.values():  # the EMA function treats a list as all float or all not
            ema.multi_avg_fn(averaged, current, ema.n_averaged)
    ema.n_averaged += 1


def replicated(module: nn.Module) -> Iterator[torch.Tensor]:
    """What of a sharded module is held whole by every rank and may differ between them: its buffers
    (BatchNorm running statistics, the EMA's n_averaged), which FSDP leaves unsharded."""
    return module.buffers()


@dataclass(frozen=True)
class FullStateTrainables(ckpt_io.Trainables):
    """Trainables whose checkpoints hold full, unsharded state dicts (torch.distributed.checkpoint.state_dict),
    so that export, resume and serving read them as they read DDP's. `gather()` is collective: every rank calls
    it, rank 0 alone keeps the result (in CPU memory, one tensor gathered at a time), which `weights()` and
    `state()` then return. Optimizer states are keyed by parameter name, not index, whatever the world size;
    also used with one process, so that a run resumes under another world size."""

    gathered: dict[str, Any] = field(default_factory=dict)

    def gather(self) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = {"model": get_model_state_dict(self.model, options=full)}
        if self.ema is not None:
            weights["ema"] = get_model_state_dict(self.ema, options=full)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        self.gathered.update(weights=weights, optimizer=optimizer)

    def weights(self) -> dict[str, Any]:
        return self.gathered["weights"]

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.gathered["optimizer"], "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load(self, ckpt: dict[str, Any]) -> None:
        """Every rank loads the whole checkpoint (as train() reads it) and keeps its own shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        if self.ema is not None and "ema" not in ckpt:
            raise ValueError(f"cannot resume with --ema from {ckpt.get('path', 'this checkpoint')}: it holds no "
                             "EMA state (its run was trained without --ema)")
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, ckpt["model"], options=full)
        # Not strict: after the head phase the backbone has no AdamW state yet (it was frozen), which torch
        # would otherwise refuse ("Missing optimizer state for parameter ... that requires gradients").
        set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        # torch creates every parameter's state first (a step with zero gradients: step 1, zero moments); a
        # parameter without saved state must start afresh, or its first real step's bias correction is off.
        saved = ckpt["optimizer"]["state"]
        for name, p in self.model.named_parameters():
            if name not in saved:
                self.optimizer.state.pop(p, None)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            set_model_state_dict(self.ema, ckpt["ema"], options=full)


class EvenBatches:
    """Validation batches for sharded ranks: every rank must run the same number of forwards (each all-gathers
    the weights with the others), but validation is sharded without padding, so a rank can have one batch
    fewer. It gets empty batches (0 images: they add nothing to the summed metrics) up to the ranks' maximum."""

    def __init__(self, loader: Iterable, input_size: int, env: DistEnv):
        self.loader = loader
        self.input_size = input_size
        n = torch.tensor([len(loader)], device=env.device)  # type: ignore[arg-type]
        if env.distributed:
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        self.batches = int(n.item())

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = 0
        for batch in self.loader:
            n += 1
            yield batch
        for _ in range(self.batches - n):
            yield (torch.zeros(0, 3, self.input_size, self.input_size), torch.zeros(0, dtype=torch.int64))

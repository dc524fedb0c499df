"""Weight EMA (`--ema`): an exponential moving average of the weights, BatchNorm statistics included, kept by
torch's own `AveragedModel` and updated after every optimizer step; what is evaluated, picks the best epoch and
is exported when the option is on."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

log = logging.getLogger(__name__)

MAX_AUTO_DECAY = 0.9998  # timm's default, for runs of tens of thousands of steps
AUTO_WINDOWS = 10  # the derived decay's time constant is 1/10 of the run: the first weights end at e^-10


def resolve_decay(decay: float, total_steps: int) -> float:
    """`--ema-decay`, or for -1 one derived from the run's length: a time constant 1/(1 - decay) of a tenth of
    the optimizer steps, so the EMA forgets the initial random head, yet averages a stretch of the run."""
    if decay != -1:
        return decay
    return min(MAX_AUTO_DECAY, max(0.0, 1.0 - AUTO_WINDOWS / max(1, total_steps)))


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of the *unwrapped* model (no DDP, not compiled): its keys match the model's own."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.eval()  # never trained itself; evaluation reads its averaged BatchNorm statistics
    ema.requires_grad_(False)
    return ema


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An AveragedModel's state dict -> the averaged network's own (the keys of the model it averages)."""
    state = {k: v for k, v in ema_state.items() if k != "n_averaged"}
    consume_prefix_in_state_dict_if_present(state, "module.")
    return state

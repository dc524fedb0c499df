"""`--compile`: torch.compile of the module the training steps run, never of the model that is evaluated,
checkpointed and exported (whose state-dict keys therefore never carry torch.compile's `_orig_mod.`)."""
from __future__ import annotations

import torch
import torch.nn as nn


def check_compile(device: torch.device, backend: str) -> None:
    """Compile (with `backend`) and run a one-line function on `device`, so that a platform without what torch.compile needs
    (a C++ compiler on CPU, Triton on CUDA, a supported Python) fails now, in one line naming the flag, rather
    than at the first training step in a long traceback."""
    try:
        torch.compile(_probe, fullgraph=True, backend=backend)(torch.ones(2, device=device))
    except Exception as e:  # noqa: BLE001 - InductorError, BackendCompilerFailed, RuntimeError: all mean "cannot"
        # The first line that says what failed, not a header such as "backend='inductor' raised:".
        lines = (line.strip() for line in str(e).splitlines())
        reason = next((line for line in lines if line and not line.endswith(":")), type(e).__name__)
        raise ValueError(f"--compile cannot work on this machine ({reason}); train without --compile") from None


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def compiled(model: nn.Module, backend: str) -> nn.Module:
    """A compiled view of `model` sharing its parameters, to be wrapped in DDP afterwards: torch's guide ("Where
    to apply torch.compile?") compiles the inner module, since Dynamo does not handle DDP wrappers well."""
    return torch.compile(model, backend=backend)

"""``training.precision``: what the run computes in, chosen once at start and never silently changed.

=========  ==========================================================================================
request    what runs
=========  ==========================================================================================
``auto``   CUDA with bf16 (Ampere and later): bf16; older CUDA: fp16 with dynamic loss scaling;
           CPU: fp32. The choice is logged and recorded in the results (``precision``).
``bf16``   bf16 autocast (FSDP2: bf16 parameters for compute, fp32 gradient reduction), fp32 master
           weights and optimizer state. On CPU it runs CPU bf16 autocast; a GPU without bf16 is an
           error at start naming the field and the alternatives.
``fp16``   fp16 autocast with dynamic loss scaling (:class:`LossScaler`): a step whose scaled
           gradients overflow is skipped (no optimizer update), counted, and the scale halves; the
           scaler's state is in every checkpoint, so a resume is exact.
``fp32``   no autocast.
=========  ==========================================================================================
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from crucible.trainer.faults import SpecError


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def loss_scaling(self) -> bool:
        return self.name == "fp16"


def resolve(requested: str, device: torch.device, strategy: str) -> Precision:
    """The precision this run computes in, or a SpecError when the device cannot run the request."""
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else "CPU"
    bf16_ok = (not cuda) or torch.cuda.is_bf16_supported()
    if requested == "auto":
        if not cuda:
            choice = Precision("fp32", requested, "auto on CPU: fp32")
        elif bf16_ok:
            choice = Precision("bf16", requested, f"auto on {gpu}: bf16 autocast, fp32 master weights")
        else:
            choice = Precision("fp16", requested, f"auto on {gpu} (no bf16): fp16 with dynamic loss scaling")
    elif requested == "bf16" and not bf16_ok:
        raise SpecError(
            f"training.precision: bf16 was requested but {gpu} cannot run bf16; use fp16 (dynamic loss "
            "scaling), fp32, or auto (chooses fp16 here and records it in the results)"
        )
    else:
        choice = Precision(requested, requested, f"{requested} as requested on {gpu}")
    if strategy == "parallel" and choice.loss_scaling:
        raise SpecError(
            "training.precision: fp16 loss scaling is not available with training.parallelism layouts; "
            "use bf16 (or auto on a GPU with bf16)"
        )
    if strategy == "deepspeed" and not cuda and choice.name != "fp32":
        raise SpecError(
            f"training.precision: {choice.name} with training.strategy deepspeed needs a GPU (DeepSpeed's "
            "CPU path trains in fp32); use precision fp32 or auto, or strategy ddp/fsdp, which autocast on CPU"
        )
    return choice


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)


class LossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018): multiply the loss by ``scale``; a step whose
    gradients hold inf/NaN is skipped and the scale halves; after ``growth_interval`` clean steps it
    doubles. The decision uses the global gradient norm, so every rank skips the same steps."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.overflows = 0

    def update(self, grad_norm_scaled: float) -> bool:
        """Record the step's scaled gradient norm; True when the step must be skipped (overflow)."""
        if not math.isfinite(grad_norm_scaled):
            self.overflows += 1
            self.good_steps = 0
            self.scale = max(self.scale / 2.0, 1.0)
            return True
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
        return False

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self.scale, dtype=torch.float64),
                "goodSteps": torch.tensor(self.good_steps, dtype=torch.int64),
                "overflows": torch.tensor(self.overflows, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["goodSteps"])
        self.overflows = int(state["overflows"])

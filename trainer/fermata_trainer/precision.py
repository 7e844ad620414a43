"""Which mixed precision a run trains in, from ``training.precision`` and the hardware.

The weights stay float32 in every case; only the forward pass runs under autocast.

* ``auto`` → bf16 autocast on CUDA compute capability ≥ 8.0 (A10G, L4, A100, H100), fp16
  autocast with a gradient scaler below it (T4 7.5, V100 7.0: no native bf16), float32 on CPU.
* ``fp16`` → fp16 autocast with a gradient scaler, on CUDA or CPU.
* ``bf16`` → bf16 autocast on CPU or CUDA ≥ 8.0; on an older GPU it is a configuration error
  (exit 2): it would be emulated, slowly, and the user asked for it explicitly. ``auto`` is the
  choice that adapts to whatever GPU the pod lands on.
* ``fp32`` → no autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fermata_api import Precision
from fermata_trainer.errors import TrainerConfigError

#: The first CUDA compute capability with native bf16 (Ampere).
BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class PrecisionChoice:
    """The autocast dtype (None: float32, no autocast), whether a gradient scaler is needed, and
    why (shown in ``status.progress.precisionReason``)."""

    dtype: torch.dtype | None
    use_scaler: bool
    reason: str

    @property
    def name(self) -> str:
        """``bf16``, ``fp16`` or ``fp32`` (``status.progress.precision``)."""
        if self.dtype is torch.bfloat16:
            return "bf16"
        if self.dtype is torch.float16:
            return "fp16"
        return "fp32"


def _describe(device_type: str, capability: tuple[int, int] | None) -> str:
    if device_type == "cuda" and capability is not None:
        return f"CUDA compute capability {capability[0]}.{capability[1]}"
    return device_type.upper() if device_type == "cpu" else device_type


def _has_native_bf16(device_type: str, capability: tuple[int, int] | None) -> bool:
    if device_type == "cuda":
        return capability is not None and capability >= BF16_MIN_CAPABILITY
    return device_type == "cpu"


def choose_precision(
    requested: Precision, device_type: str, capability: tuple[int, int] | None
) -> PrecisionChoice:
    """The precision to train in (see the module docstring); ``capability`` is the CUDA device's
    ``(major, minor)`` compute capability (None off CUDA). Raises :class:`TrainerConfigError`
    for an explicit ``bf16`` the device cannot run natively."""
    where = _describe(device_type, capability)
    if requested is Precision.fp32:
        return PrecisionChoice(None, False, f"fp32 requested ({where})")
    if requested is Precision.fp16:
        return PrecisionChoice(torch.float16, True, f"fp16 requested ({where}): gradient scaler on")
    bf16 = _has_native_bf16(device_type, capability)
    if requested is Precision.bf16:
        if not bf16:
            raise TrainerConfigError(
                f"training.precision bf16 needs CUDA compute capability ≥ 8.0 or the CPU; this is "
                f"{where}: use auto (fp16 with a gradient scaler here) or fp16 or fp32"
            )
        return PrecisionChoice(torch.bfloat16, False, f"bf16 requested ({where})")
    if device_type != "cuda":
        return PrecisionChoice(None, False, f"auto on {where}: fp32")
    if bf16:
        return PrecisionChoice(torch.bfloat16, False, f"auto on {where} (≥ 8.0): bf16 autocast")
    return PrecisionChoice(
        torch.float16,
        True,
        f"auto on {where} (< 8.0, no native bf16): fp16 autocast with a gradient scaler",
    )


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)

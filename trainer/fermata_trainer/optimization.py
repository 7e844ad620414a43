"""Loss, optimizer and learning-rate schedule of the fine-tuning."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def codebook_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy per codebook under ``mask``, averaged over codebooks.

    ``logits`` ``[B, K, T, card]``, ``targets`` ``[B, K, T]``, ``mask`` ``[B, K, T]`` (the
    pattern's valid positions and the segments' non-padded frames). Returns the mean loss and,
    per codebook, the summed cross-entropy and the number of positions (for exact dataset-level
    validation means).
    """
    num_codebooks = logits.shape[1]
    sums = []
    counts = []
    for k in range(num_codebooks):
        valid = mask[:, k]
        logits_k = logits[:, k][valid].float()
        targets_k = targets[:, k][valid]
        sums.append(F.cross_entropy(logits_k, targets_k, reduction="sum"))
        counts.append(valid.sum())
    ce_sum = torch.stack(sums)
    count = torch.stack(counts).to(ce_sum.dtype)
    per_codebook = ce_sum / count.clamp(min=1.0)
    return per_codebook.mean(), ce_sum.detach(), count.detach()


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (β 0.9/0.95); weight decay on matrices and embeddings, not on biases and norms.

    The fused kernel (one pass over all parameters, on the CPU and CUDA alike) when every
    parameter is a floating-point tensor on one such device: on the tiny CPU model its step is
    5 ms against 25 ms for the per-tensor loop (benchmarks/trainer_overhead.py)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
    )

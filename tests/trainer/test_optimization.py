"""The optimizer the trainer builds: AdamW groups, and the fused kernel where it applies."""

from __future__ import annotations

import torch
from torch import nn

from fermata_trainer.optimization import build_optimizer


def test_adamw_is_fused_on_the_cpu_with_decay_only_on_matrices() -> None:
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    opt = build_optimizer(model, 1e-3, 0.1)
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {tuple(p.shape) for p in decay["params"]} == {(16, 8), (8, 8)}
    assert all(p.ndim == 1 for p in no_decay["params"])
    # One step moves the weights like the per-tensor AdamW does.
    reference = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(
        [
            {"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
    )
    tokens = torch.arange(16).view(2, 8)
    for net, optimizer in ((model, opt), (reference, ref_opt)):
        net(tokens).pow(2).mean().backward()
        optimizer.step()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want)


def test_fused_for_any_float_dtype_and_not_without_trainable_parameters() -> None:
    assert build_optimizer(nn.Linear(4, 4).to(torch.float64), 1e-3, 0.0).defaults["fused"] is True
    frozen = nn.Linear(4, 4).requires_grad_(False)
    assert not build_optimizer(frozen, 1e-3, 0.0).defaults["fused"]

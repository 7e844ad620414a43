"""Text conditions for MusicGen's LM, with classifier-free-guidance dropout per sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def make_attributes(lm: Any, prompts: Sequence[str | None], sample_rate: int) -> list[Any]:
    """``ConditioningAttributes`` for ``prompts`` (None = unconditioned).

    Every text conditioner other than ``description`` gets None, and waveform conditioners
    (musicgen-melody's chroma) get an empty waveform, as MusicGen does for text-only prompts.
    """
    from audiocraft.modules.conditioners import ConditioningAttributes, WavCondition

    provider = lm.condition_provider
    text_names = list(getattr(provider, "text_conditions", ["description"])) or ["description"]
    wav_names = list(getattr(provider, "wav_conditions", []))
    device = next(iter(lm.parameters())).device
    out = []
    for prompt in prompts:
        attributes = ConditioningAttributes(
            text={name: (prompt if name == "description" else None) for name in text_names}
        )
        for name in wav_names:
            attributes.wav[name] = WavCondition(
                torch.zeros((1, 1, 1), device=device),
                torch.tensor([0], device=device),
                sample_rate=[sample_rate],
                path=[None],
            )
        out.append(attributes)
    return out


def cfg_dropout_mask(count: int, probability: float, seed: int, step: int, stream: int) -> list[bool]:
    """Which samples are trained unconditioned: a fresh generator per (seed, step, stream), so
    resuming at any step replays the same choices without saved generator state."""
    if probability <= 0:
        return [False] * count
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_033 + step) * 1_009 + stream)
    draws = torch.rand(count, generator=generator)
    return [bool(d < probability) for d in draws]


def apply_cfg_dropout(prompts: Sequence[str], mask: Sequence[bool]) -> list[str | None]:
    return [None if drop else prompt for prompt, drop in zip(prompts, mask, strict=True)]

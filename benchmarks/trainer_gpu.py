"""Training-step throughput of a MusicGen-small-shaped LM (audiocraft ``LMModel``), no downloads.

Builds audiocraft's ``LMModel`` with MusicGen-small's shapes and random weights — 24 layers,
dim 1024, 16 heads, FFN 4096, pre-norm, no biases, 4 codebooks x 2048 cards with the delay
pattern, cross-attention on a T5-base-sized text context — and times full training steps
(forward, masked per-codebook cross-entropy, backward, grad-clip, AdamW) on precomputed random
EnCodec codes (50 frames/s) and precomputed random "T5 states" (16 tokens x 768, through a
trainable 768 -> dim projection, as MusicGen's T5 conditioner does). bf16 autocast on CUDA.

Prints: parameters, tokens/s (frames x codebooks per second, from the median step time), step
time (median, mean, min, max over the timed steps), peak memory, achieved TFLOP/s and MFU. FLOPs per step (forward + backward = 3 x forward; causal masking not
discounted, as in the PaLM MFU convention)::

    P      = B * S                 # LM positions per step; S = T + 1 for the delay pattern
                                   # (audiocraft keeps only valid steps; read from the pattern)
    N_pos  = params applied at every position: transformer (without cross-attention K/V
             projections) + output heads + out_norm          # embeddings are lookups: excluded
    N_ckv  = cross-attention K/V projection params (applied to the C condition tokens only)
    FLOPs  = 6 * N_pos * P + 6 * (N_ckv + N_proj) * B * C     # N_proj: the 768 -> dim projection
           + 12 * L * d * S * P                               # self-attention scores + values
           + 12 * L * d * C * P                               # cross-attention scores + values
    MFU    = FLOPs / step_time / peak_bf16_flops

``--device cpu --tiny`` is a smoke run anyone can do (see ``trainer_cpu.py``). Examples::

    python benchmarks/trainer_gpu.py                                # CUDA, musicgen-small, 30 s
    python benchmarks/trainer_gpu.py --batch-size 16 --segment-seconds 10 --steps 30
    python benchmarks/trainer_gpu.py --device cpu --tiny            # smoke check without a GPU
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Dense bf16 peak (TFLOP/s, no sparsity) by GPU name substring; first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

FRAME_RATE = 50  # EnCodec 32 kHz frames per second (MusicGen)


@dataclass(frozen=True)
class LMShape:
    """The LM hyper-parameters that matter for cost."""

    name: str
    dim: int
    num_layers: int
    num_heads: int
    hidden_scale: int
    n_q: int
    card: int
    cond_tokens: int
    cond_dim: int


MUSICGEN_SMALL = LMShape("musicgen-small", 1024, 24, 16, 4, 4, 2048, 16, 768)
TINY = LMShape("tiny", 256, 4, 4, 4, 4, 2048, 16, 768)


@dataclass(frozen=True)
class Result:
    shape: LMShape
    device: str
    precision: str
    batch_size: int
    frames: int
    steps: int
    params_total: int
    params_trainable_per_position: int
    step_time_s: float  # median over the timed steps
    step_time_mean_s: float
    step_time_min_s: float
    step_time_max_s: float
    tokens_per_s: float
    flops_per_step: float
    peak_memory_bytes: int
    peak_memory_kind: str
    loss_first: float
    loss_last: float
    mfu: float | None
    peak_tflops: float | None


class TinyLMBench(nn.Module):
    """audiocraft ``LMModel`` plus the T5-output projection MusicGen's text conditioner trains."""

    def __init__(self, shape: LMShape) -> None:
        super().__init__()
        from audiocraft.models.lm import LMModel
        from audiocraft.modules.codebooks_patterns import DelayedPatternProvider
        from audiocraft.modules.conditioners import ConditionFuser, ConditioningProvider

        self.shape = shape
        self.cond_proj = nn.Linear(shape.cond_dim, shape.dim)
        self.lm = LMModel(
            pattern_provider=DelayedPatternProvider(n_q=shape.n_q, delays=list(range(shape.n_q))),
            condition_provider=ConditioningProvider({}),
            fuser=ConditionFuser(fuse2cond={"cross": ["description"], "prepend": [], "sum": []}),
            n_q=shape.n_q,
            card=shape.card,
            dim=shape.dim,
            num_heads=shape.num_heads,
            hidden_scale=shape.hidden_scale,
            num_layers=shape.num_layers,
            norm="layer_norm",
            norm_first=True,
            bias_proj=False,
            bias_ff=False,
            bias_attn=False,
            activation="gelu",
            dropout=0.0,
            causal=True,
            cross_attention=True,
            memory_efficient=True,  # torch scaled_dot_product_attention backend
            positional_embedding="sin",
            weight_init="gaussian",
            depthwise_init="current",
            zero_bias_init=True,
        )

    def loss(self, codes: torch.Tensor, t5_states: torch.Tensor) -> torch.Tensor:
        """MusicGen's training loss: mean over codebooks of the CE on valid (masked) positions."""
        cond = self.cond_proj(t5_states)
        mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        out = self.lm.compute_predictions(codes, [], condition_tensors={"description": (cond, mask)})
        total = torch.zeros((), device=codes.device)
        for k in range(self.shape.n_q):
            valid = out.mask[:, k]
            logits = out.logits[:, k][valid].float()
            total = total + F.cross_entropy(logits, codes[:, k][valid])
        return total / self.shape.n_q


def count_params(model: TinyLMBench) -> tuple[int, int, int, int]:
    """(total, per-position, cross-attention K/V, condition projection) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for p in model.lm.emb.parameters())
    proj = sum(p.numel() for p in model.cond_proj.parameters())
    d = model.shape.dim
    ckv = 0
    for name, p in model.lm.transformer.named_parameters():
        if ".cross_attention." in name and "in_proj_weight" in name:
            ckv += 2 * d * d  # K and V rows of the packed [3d, d] in-projection
        elif ".cross_attention." in name and "in_proj_bias" in name:
            ckv += 2 * d
        elif ".cross_attention." in name and name.endswith(("k_proj.weight", "v_proj.weight")):
            ckv += p.numel()
    per_position = total - emb - proj - ckv
    return total, per_position, ckv, proj


def sequence_length(model: TinyLMBench, frames: int) -> int:
    """Positions the LM runs over for ``frames`` frames (the interleaving pattern's length)."""
    pattern = model.lm.pattern_provider.get_pattern(frames)
    dummy = torch.zeros(1, model.shape.n_q, frames, dtype=torch.long)
    seq, _, _ = pattern.build_pattern_sequence(dummy, model.lm.special_token_id, keep_only_valid_steps=True)
    return int(seq.shape[-1])


def flops_per_step(model: TinyLMBench, batch: int, frames: int) -> float:
    """Training FLOPs per step, the formula in the module docstring."""
    s = model.shape
    _, n_pos, n_ckv, n_proj = count_params(model)
    seq = sequence_length(model, frames)
    positions = batch * seq
    dense = 6.0 * n_pos * positions + 6.0 * (n_ckv + n_proj) * batch * s.cond_tokens
    attention = 12.0 * s.num_layers * s.dim * (seq + s.cond_tokens) * positions
    return dense + attention


def peak_tflops_for(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    shape: LMShape,
    device: torch.device,
    batch_size: int,
    segment_seconds: float,
    steps: int,
    warmup: int,
    precision: str,
    peak_tflops: float | None = None,
    compile_model: bool = False,
    seed: int = 0,
) -> Result:
    torch.manual_seed(seed)
    frames = max(1, int(round(segment_seconds * FRAME_RATE)))
    model = TinyLMBench(shape).to(device)
    model.train()
    fused = device.type == "cuda"
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    loss_fn: Any = torch.compile(model.loss) if compile_model else model.loss
    # A few distinct precomputed batches, cycled (data loading is not what is measured).
    n_batches = 4
    gen = torch.Generator(device="cpu").manual_seed(seed)
    codes = [
        torch.randint(0, shape.card, (batch_size, shape.n_q, frames), generator=gen).to(device)
        for _ in range(n_batches)
    ]
    t5 = [
        torch.randn(batch_size, shape.cond_tokens, shape.cond_dim, generator=gen).to(device)
        for _ in range(n_batches)
    ]
    use_bf16 = precision == "bf16"

    def step(i: int) -> float:
        optim.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(codes[i % n_batches], t5[i % n_batches])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        return float(loss.detach())

    losses: list[float] = []
    for i in range(warmup):
        losses.append(step(i))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for i in range(steps):
        start = time.perf_counter()
        losses.append(step(warmup + i))  # float(loss) synchronises every step
        _sync(device)
        times.append(time.perf_counter() - start)

    median = statistics.median(times)
    flops = flops_per_step(model, batch_size, frames)
    if device.type == "cuda":
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(device), "max allocated (CUDA)"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem_kind = "process peak RSS"
    peak = peak_tflops if peak_tflops is not None else peak_tflops_for(device)
    total, per_position, _, _ = count_params(model)
    return Result(
        shape=shape,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        precision=precision,
        batch_size=batch_size,
        frames=frames,
        steps=steps,
        params_total=total,
        params_trainable_per_position=per_position,
        step_time_s=median,
        step_time_mean_s=statistics.fmean(times),
        step_time_min_s=min(times),
        step_time_max_s=max(times),
        tokens_per_s=batch_size * frames * shape.n_q / median,
        flops_per_step=flops,
        peak_memory_bytes=peak_mem,
        peak_memory_kind=mem_kind,
        loss_first=losses[0],
        loss_last=losses[-1],
        mfu=(flops / median / (peak * 1e12)) if peak else None,
        peak_tflops=peak,
    )


def report(r: Result, show_mfu: bool = True) -> str:
    s = r.shape
    lines = [
        f"model            {s.name}: dim {s.dim}, {s.num_layers} layers, {s.num_heads} heads, "
        f"{s.n_q} codebooks x {s.card} cards, cross-attn context {s.cond_tokens} x {s.cond_dim}",
        f"parameters       {r.params_total / 1e6:.1f} M total, "
        f"{r.params_trainable_per_position / 1e6:.1f} M applied per position",
        f"device           {r.device}, {r.precision}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads",
        f"batch            {r.batch_size} x {r.frames} frames ({r.frames / FRAME_RATE:.1f} s) "
        f"x {s.n_q} codebooks = {r.batch_size * r.frames * s.n_q} tokens/step",
        f"step time        {r.step_time_s * 1e3:.1f} ms median of {r.steps} timed steps "
        f"(mean {r.step_time_mean_s * 1e3:.1f}, min {r.step_time_min_s * 1e3:.1f}, "
        f"max {r.step_time_max_s * 1e3:.1f})",
        f"throughput       {r.tokens_per_s:,.0f} tokens/s (frames x codebooks), "
        f"{r.tokens_per_s / s.n_q / FRAME_RATE:.1f} audio-seconds/s",
        f"peak memory      {r.peak_memory_bytes / 2**30:.2f} GiB ({r.peak_memory_kind})",
        f"compute          {r.flops_per_step / 1e12:.3f} TFLOP/step, "
        f"{r.flops_per_step / r.step_time_s / 1e12:.2f} TFLOP/s achieved",
        f"loss             {r.loss_first:.3f} -> {r.loss_last:.3f} "
        f"(random codes: ~ln({s.card}) = {math.log(s.card):.3f})",
    ]
    if show_mfu:
        if r.mfu is None:
            lines.append("MFU              n/a (no bf16 peak known for this device; --peak-tflops)")
        else:
            lines.append(f"MFU              {100 * r.mfu:.1f} % of {r.peak_tflops:.0f} TFLOP/s bf16")
    return "\n".join(lines)


def quiet_imports() -> None:
    """Silence audiocraft/xformers import chatter; the figures are the output."""
    os.environ.setdefault("XFORMERS_MORE_DETAILS", "0")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny LM (dim 256, 4 layers) for smoke runs")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--segment-seconds", type=float, default=None, help="default 30 (tiny: 5)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, default 20 (tiny: 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, default 5 (tiny: 3)")
    p.add_argument(
        "--precision", choices=["bf16", "fp32"], default=None, help="default bf16 on CUDA, else fp32"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss function")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; run with --device cpu --tiny for a smoke check.")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.tiny
    quiet_imports()
    result = run(
        shape=TINY if tiny else MUSICGEN_SMALL,
        device=device,
        batch_size=args.batch_size or (2 if tiny else 8),
        segment_seconds=args.segment_seconds or (5.0 if tiny else 30.0),
        steps=args.steps or (10 if tiny else 20),
        warmup=args.warmup if args.warmup is not None else (3 if tiny else 5),
        precision=args.precision or ("bf16" if device.type == "cuda" else "fp32"),
        peak_tflops=args.peak_tflops,
        compile_model=args.compile,
    )
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Preparation throughput on the CPU: audio seconds per CPU second, decode and tokenize apart.

Writes ``--clips`` synthetic clips (MagnaTagATune-like by default: 30 s, 16 kHz mono MP3, written
with soundfile) and times, for each compression model, the two stages of
``codes_cache.encode_clip`` separately:

* **decode** — ``audio_io.decode_audio`` (libsndfile, PyAV as fallback) plus audiocraft's
  ``convert_audio`` (resample and remix to the model's rate and channels);
* **tokenize** — ``compression_model.encode`` of the converted waveform (EnCodec encoder +
  residual VQ), under ``torch.inference_mode``.

Models: ``tiny`` — the trainer's ``tiny://seed=0`` EnCodec (16 kHz, 4 filters, 4 x 64 codes) —
and ``encodec32k`` — a real-size EnCodec 32 kHz built by audiocraft's builders with random
weights, in musicgen-small's compression configuration (SEANet, 64 filters, ratios 8-5-4-4,
latent 128, 2 LSTM layers, weight norm; RVQ 4 x 2048 at 50 Hz). Random weights cost the same as
trained ones. CPU seconds are ``time.process_time`` (every thread of the process); wall seconds
are ``time.perf_counter``. Prints the median of ``--repeats`` with the min-max spread::

    .venv/bin/python benchmarks/prepare_throughput.py                       # 2 x 30 s MP3, 3 repeats
    .venv/bin/python benchmarks/prepare_throughput.py --models tiny --format wav --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fermata_dev.synthetic import synth_clip  # noqa: E402
from fermata_trainer.audio_io import decode_audio  # noqa: E402
from fermata_trainer.model_loading import build_tiny_musicgen  # noqa: E402

#: musicgen-small's compression model (audiocraft's ``encodec_32khz``), random weights
ENCODEC_32KHZ: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "sample_rate": 32000,
    "channels": 1,
    "compression_model": "encodec",
    "encodec": {
        "autoencoder": "seanet",
        "quantizer": "rvq",
        "sample_rate": 32000,
        "channels": 1,
        "causal": False,
        "renormalize": False,
    },
    "seanet": {
        "channels": 1,
        "dimension": 128,
        "n_filters": 64,
        "n_residual_layers": 1,
        "ratios": [8, 5, 4, 4],
        "activation": "ELU",
        "activation_params": {"alpha": 1.0},
        "norm": "weight_norm",
        "norm_params": {},
        "kernel_size": 7,
        "last_kernel_size": 7,
        "residual_kernel_size": 3,
        "dilation_base": 2,
        "causal": False,
        "pad_mode": "constant",
        "true_skip": True,
        "compress": 2,
        "lstm": 2,
        "disable_norm_outer_blocks": 0,
        "encoder": {},
        "decoder": {"trim_right_ratio": 1.0, "final_activation": None, "final_activation_params": None},
    },
    "rvq": {"n_q": 4, "bins": 2048, "decay": 0.99, "kmeans_init": False, "threshold_ema_dead_code": 2},
}


def build_model(name: str) -> Any:
    """The compression model ``name`` (eval mode, no gradients)."""
    if name == "tiny":
        return build_tiny_musicgen(seed=0).compression_model
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = builders.get_compression_model(OmegaConf.create(ENCODEC_32KHZ)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def write_clips(folder: Path, clips: int, seconds: float, rate: int, fmt: str) -> list[Path]:
    paths = []
    for i in range(clips):
        path = folder / f"clip-{i}.{fmt}"
        sf.write(str(path), synth_clip(i, seconds, rate), rate, format=fmt.upper())
        paths.append(path)
    return paths


@dataclass
class Timing:
    cpu_s: float
    wall_s: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, Timing(time.process_time() - cpu, time.perf_counter() - wall)


def decode_all(paths: list[Path], model: Any) -> list[torch.Tensor]:
    from audiocraft.data.audio_utils import convert_audio

    out = []
    for path in paths:
        samples, rate = decode_audio(path)
        out.append(convert_audio(torch.from_numpy(samples)[None], rate, model.sample_rate, model.channels))
    return out


@torch.inference_mode()
def tokenize_all(waves: list[torch.Tensor], model: Any) -> int:
    frames = 0
    for wav in waves:
        codes, _ = model.encode(wav)
        frames += int(codes.shape[-1])
    return frames


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def measure(name: str, paths: list[Path], audio_seconds: float, repeats: int) -> list[str]:
    model = build_model(name)
    params = sum(p.numel() for p in model.encoder.parameters()) + sum(
        p.numel() for p in model.quantizer.parameters()
    )
    tokenize_all(decode_all(paths[:1], model), model)  # warm-up: allocator, kernels
    decode: list[Timing] = []
    tokenize: list[Timing] = []
    for _ in range(repeats):
        waves, t_decode = timed(lambda: decode_all(paths, model))
        frames, t_tokenize = timed(lambda w=waves: tokenize_all(w, model))  # type: ignore[misc]
        decode.append(t_decode)
        tokenize.append(t_tokenize)
    both = [Timing(d.cpu_s + t.cpu_s, d.wall_s + t.wall_s) for d, t in zip(decode, tokenize, strict=True)]
    lines = [
        f"{name}: {model.sample_rate} Hz, {model.frame_rate:.0f} frames/s, {params / 1e6:.2f} M encoder+RVQ "
        f"parameters, {frames} frames per repetition (median [min-max] of {repeats})"
    ]
    for stage, timings in (("decode", decode), ("tokenize", tokenize), ("both", both)):
        per_cpu = [audio_seconds / t.cpu_s for t in timings]
        per_wall = [audio_seconds / t.wall_s for t in timings]
        lines.append(
            f"  {stage:<9} audio s / CPU s {spread(per_cpu):<22} audio s / wall s {spread(per_wall):<22}"
            f"CPU {spread([t.cpu_s for t in timings], '{:.2f}')} s  wall {spread([t.wall_s for t in timings], '{:.2f}')} s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each clip")
    p.add_argument("--rate", type=int, default=16000, help="sample rate of the written clips")
    p.add_argument("--format", choices=["mp3", "wav", "flac"], default="mp3")
    p.add_argument("--models", default="tiny,encodec32k", help="comma-separated: tiny, encodec32k")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fermata-prepare-bench-") as tmp:
        paths = write_clips(Path(tmp), args.clips, args.seconds, args.rate, args.format)
        audio_seconds = args.clips * args.seconds
        print(
            f"{args.clips} x {args.seconds:g} s {args.format.upper()} at {args.rate} Hz mono "
            f"({audio_seconds:g} audio s per repetition), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        for name in args.models.split(","):
            print("\n".join(measure(name.strip(), paths, audio_seconds, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

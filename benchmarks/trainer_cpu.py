"""Training-step throughput of a tiny MusicGen-shaped LM on the CPU: a benchmark anyone can run.

The same measurement as ``trainer_gpu.py`` (audiocraft ``LMModel``, delay pattern, 4 codebooks x
2048 cards, cross-attention on 16 x 768 precomputed "T5 states", random weights and codes, no
downloads), scaled down — dim 256, 4 layers, 4 heads — so that it finishes in well under a
minute on a laptop. Prints parameters, step time, tokens/s (frames x codebooks), peak RSS and
achieved TFLOP/s (no MFU: there is no meaningful CPU peak to divide by)::

    python benchmarks/trainer_cpu.py
    python benchmarks/trainer_cpu.py --batch-size 4 --segment-seconds 10 --steps 10 --threads 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_gpu import TINY, quiet_imports, report, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--segment-seconds", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_imports()
    result = run(
        shape=TINY,
        device=torch.device("cpu"),
        batch_size=args.batch_size,
        segment_seconds=args.segment_seconds,
        steps=args.steps,
        warmup=args.warmup,
        precision=args.precision,
    )
    print(report(result, show_mfu=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

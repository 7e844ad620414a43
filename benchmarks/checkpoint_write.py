"""How long a musicgen-small checkpoint takes to write: does it fit the spot notice?

Builds a musicgen-small-sized training state as plain fp32 tensors — 24 transformer layers of
dim 1024 (self- and cross-attention 4 x d², FFN 2 x d x 4096, norms) plus 4 codebook embeddings
(2049 x 1024) and 4 output heads (1024 x 2048): 420 M parameters, 1.68 GB — and AdamW's
``exp_avg`` and ``exp_avg_sq`` of the same size, ≈ 5 GB in all (``--params`` scales the layer
count). Each repetition then writes it through the trainer's own path — ``torch.save`` of the
model, the optimizer and a small state file to a staging folder (what
``Trainer._write_checkpoint`` does), then ``CheckpointStore.write``: sha256 of every file, an
``S3Storage`` upload of each, the manifest last — to a real S3 server (versitygw on loopback, as
the tests start it from ``tests/s3server/bin/versitygw``), once with parallel multipart uploads
(``--concurrency`` parts in flight, 64 MiB parts) and once as a single stream
(``max_concurrency=1``) for comparison. Prints serialise, upload (hash + transfer + manifest) and
total seconds and MB/s, the median of ``--repeats`` with the min-max spread::

    .venv/bin/python benchmarks/checkpoint_write.py                         # 420 M, 3 repeats
    .venv/bin/python benchmarks/checkpoint_write.py --params 50e6 --repeats 2 --concurrency 8

Disk: the staging copy (deleted after each write) plus the server's copy (the previous one
pruned) — ~3 x the state size at peak. RAM: the state itself, held for all repetitions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fermata_trainer.checkpoints import CheckpointStore  # noqa: E402
from fermata_trainer.storage import (  # noqa: E402
    DEFAULT_TRANSFER,
    S3Storage,
    TransferSettings,
    make_s3_client,
    sha256_file,
)
from tests.s3_fixture import S3Server, build_versitygw  # noqa: E402

DIM, FFN, CODEBOOKS, CARDS = 1024, 4096, 4, 2048
SPOT_NOTICE_SECONDS = 120
DEFAULT_GRACE_SECONDS = 150  # spec.resources.terminationGracePeriodSeconds


# ----------------------------------------------------------------------------- the state


def layer_shapes() -> list[tuple[int, ...]]:
    """One pre-norm decoder layer: self-attention, cross-attention, FFN, three norms."""
    attention = [(3 * DIM, DIM), (DIM, DIM)]  # in_proj (q, k, v), out_proj
    return [*attention, *attention, (FFN, DIM), (DIM, FFN), *([(DIM,), (DIM,)] * 3)]


def model_shapes(params: float) -> list[tuple[int, ...]]:
    """Embeddings and heads, then as many layers as bring the total nearest ``params``."""
    fixed = [(CARDS + 1, DIM)] * CODEBOOKS + [(CARDS, DIM)] * CODEBOOKS + [(DIM,), (DIM,)]
    per_layer = sum(_numel(s) for s in layer_shapes())
    layers = max(1, round((params - sum(_numel(s) for s in fixed)) / per_layer))
    return fixed + layer_shapes() * layers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_state(params: float) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model state dict and an AdamW state dict (``torch.optim`` layout) of that size."""
    torch.manual_seed(0)
    shapes = model_shapes(params)
    model = {f"param.{i}": torch.randn(shape) for i, shape in enumerate(shapes)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for i, shape in enumerate(shapes):
        state[i] = {
            "step": torch.tensor(1000.0),
            "exp_avg": torch.randn(shape) * 1e-3,
            "exp_avg_sq": torch.rand(shape) * 1e-6,
        }
    group = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False}
    optimizer = {"state": state, "param_groups": [{**group, "params": list(range(len(shapes)))}]}
    return model, optimizer


# ----------------------------------------------------------------------------- one write


@dataclass
class Write:
    serialize_s: float
    upload_s: float
    total_s: float
    size_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.size_bytes / 1e6 / self.total_s

    @property
    def upload_mb_per_s(self) -> float:
        return self.size_bytes / 1e6 / self.upload_s


def serialize(staging: Path, model: dict[str, Any], optimizer: dict[str, Any], step: int) -> dict[str, Path]:
    """The files ``Trainer._write_checkpoint`` stages, written the same way."""
    files = {name: staging / name for name in ("lm.pt", "optimizer.pt", "state.pt", "metrics.json")}
    torch.save(model, files["lm.pt"])
    torch.save(optimizer, files["optimizer.pt"])
    torch.save({"format": 1, "step": step, "rng": [torch.get_rng_state()]}, files["state.pt"])
    files["metrics.json"].write_text(json.dumps({"step": step, "evaluations": []}))
    return files


def write_once(
    store: CheckpointStore, work: Path, model: dict[str, Any], optimizer: dict[str, Any], step: int
) -> Write:
    staging = work / "staging" / f"step-{step}"
    staging.mkdir(parents=True)
    try:
        started = time.monotonic()
        files = serialize(staging, model, optimizer, step)
        serialize_s = time.monotonic() - started
        ref = store.write(step, 0, "benchmark", files, serialize_seconds=serialize_s)
        total_s = time.monotonic() - started
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    store.prune()  # keep 1: bounds the server's disk
    assert ref.size_bytes is not None
    return Write(serialize_s, total_s - serialize_s, total_s, ref.size_bytes)


def hash_seconds(work: Path, model: dict[str, Any], optimizer: dict[str, Any]) -> tuple[float, int]:
    """sha256 of the staged files alone: the part of "upload" the manifest's digests cost."""
    staging = work / "staging" / "hash"
    staging.mkdir(parents=True)
    try:
        files = serialize(staging, model, optimizer, 0)
        started = time.monotonic()
        for path in files.values():
            sha256_file(path)
        return time.monotonic() - started, sum(p.stat().st_size for p in files.values())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- report


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def report(label: str, writes: list[Write]) -> str:
    rows = [
        ("serialise s", [w.serialize_s for w in writes]),
        ("upload s", [w.upload_s for w in writes]),
        ("total s", [w.total_s for w in writes]),
        ("MB/s total", [w.mb_per_s for w in writes]),
        ("MB/s upload", [w.upload_mb_per_s for w in writes]),
    ]
    lines = [f"{label}  (median [min-max] of {len(writes)})"]
    lines += [
        f"  {name:<12} {spread(values, '{:.0f}' if 'MB' in name else '{:.1f}')}" for name, values in rows
    ]
    total = statistics.median(w.total_s for w in writes)
    lines.append(
        f"  fits         {total / SPOT_NOTICE_SECONDS:.0%} of a {SPOT_NOTICE_SECONDS} s spot notice, "
        f"{total / DEFAULT_GRACE_SECONDS:.0%} of the default {DEFAULT_GRACE_SECONDS} s grace period "
        f"(CheckpointAtRisk above 80%: {'yes' if total > 0.8 * DEFAULT_GRACE_SECONDS else 'no'})"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def start_server(work: Path) -> S3Server:
    server = S3Server(binary=build_versitygw(), data_dir=work / "s3-data", log_path=work / "versitygw.log")
    server.start()
    return server


def run_mode(
    server: S3Server, work: Path, transfer: TransferSettings, label: str, state: tuple[Any, Any], repeats: int
) -> list[Write]:
    bucket = server.make_bucket(f"bench-{label}")
    client = make_s3_client(
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        max_pool_connections=max(10, 2 * transfer.max_concurrency),
    )
    storage = S3Storage(bucket, "runs/bench", client=client, transfer=transfer)
    store = CheckpointStore(storage, keep_last=1, local_dir=work / f"local-{label}")
    writes = []
    for i in range(repeats):
        w = write_once(store, work, *state, step=i + 1)
        print(
            f"  {label} #{i + 1}: serialise {w.serialize_s:.1f} s, upload {w.upload_s:.1f} s, "
            f"total {w.total_s:.1f} s, {w.mb_per_s:.0f} MB/s",
            flush=True,
        )
        writes.append(w)
    return writes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=420e6, help="model parameters (fp32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=DEFAULT_TRANSFER.max_concurrency)
    p.add_argument("--chunk-mib", type=int, default=DEFAULT_TRANSFER.chunk_size // (1024 * 1024))
    p.add_argument("--no-single-stream", action="store_true", help="skip the max_concurrency=1 comparison")
    p.add_argument(
        "--work-dir", type=Path, default=None, help="staging and server data (default: a temp dir)"
    )
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fermata-ckpt-bench-", dir=args.work_dir))
    started = time.monotonic()
    state = build_state(args.params)
    n_params = sum(t.numel() for t in state[0].values())
    print(
        f"state: {n_params / 1e6:.1f} M fp32 parameters + AdamW exp_avg, exp_avg_sq "
        f"({3 * n_params * 4 / 1e9:.2f} GB), built in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    chunk = args.chunk_mib * 1024 * 1024
    modes = [(f"parallel-{args.concurrency}", TransferSettings(chunk, chunk, args.concurrency))]
    if not args.no_single_stream:
        modes.append(("single-stream", TransferSettings(chunk, chunk, 1)))
    server = start_server(work)
    try:
        hashed_s, size = hash_seconds(work, *state)
        print(f"sha256 of the staged files alone: {hashed_s:.1f} s ({size / 1e6 / hashed_s:.0f} MB/s)")
        results = {label: run_mode(server, work, t, label, state, args.repeats) for label, t in modes}
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"checkpoint of {size / 1e9:.2f} GB ({n_params / 1e6:.1f} M parameters), {chunk >> 20} MiB parts")
    for label, writes in results.items():
        print(report(label, writes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

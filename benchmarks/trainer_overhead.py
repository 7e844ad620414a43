"""Trainer overhead against the bare step, on the CPU: Fermata's training loop vs audiocraft's step.

Both sides train the same model from the same initial weights on the same batches, in float32:

* **(a) bare step** — audiocraft only: ``lm.compute_predictions(codes, [], condition_tensors)``
  (the conditions from ``lm.condition_provider`` on pre-tokenized prompts, so the text
  conditioner's forward and backward are in both), masked cross-entropy over the codebooks by
  audiocraft's own ``MusicGenSolver._compute_cross_entropy`` (mask = pattern mask & padding
  mask, as its ``run_step`` builds it), ``backward``, ``torch.optim.AdamW.step`` and
  ``zero_grad``. Every batch (codes, padding masks, tokenized prompts) is assembled in memory
  before the clock starts, from the same code shards and in the same order as (b) reads them.
* **(b) Fermata's loop** — the real :class:`fermata_trainer.training_loop.Trainer` (``run()``,
  unmodified) over real code shards on disk (tokenized once beforehand into a local cache
  mirror, ``storage.cacheUri``), local checkpoint storage, a :class:`NullReporter` (what a run
  outside Kubernetes reports to), production JSON logging (``configure_logging``) to a file, the
  TensorBoard sink, the GPU monitor (no NVML here: a no-op), heartbeats every 30 s and a
  periodic checkpoint every ``--checkpoint-every`` steps (model, optimizer and state written,
  sha256-hashed, copied to storage, pruned to ``keepLast`` 3). stderr is not a terminal during the
  run, as in a pod, so there is no progress bar. The timed window runs from the ``train_step``
  log line of step ``warmup`` to that of step ``warmup + steps``: exactly ``steps`` train steps
  and the hooks after ``steps`` steps (its checkpoints: the multiples of ``--checkpoint-every``
  in ``[warmup, warmup + steps)``). Setup (dataset manifest, model, shard loading), the
  baseline and final evaluations, the exports and the final checkpoint lie outside it.
* **data loader** — what the trainer does to get a batch, with no model: ``BatchPlan`` order,
  indexing the in-memory segments loaded from the shards and converting them to int64, the
  CFG-dropout draw, the (augmented) prompts, ``make_attributes`` and the conditioner's
  ``tokenize`` (the data half of ``Trainer._train_step``); batches per second against (b)'s step
  rate. Loading the shards themselves (``CodesCache.load``: sha256 check and ``torch.load``,
  once per run) is timed apart.

Each repetition runs (a) and (b) back to back (a first in even repetitions, b first in odd ones,
so drift hits both) and the loader; every figure is the median of ``--reps`` repetitions with
its min-max spread, and every (b)/(a) is taken per repetition pair. Throughput is steps/s over
the timed steps (tokens/s = steps/s x batch x frames x codebooks). Besides the throughput
ratio (the figure the goal of 0.95 is about) the table breaks (b) down from its log lines: the
train step's own duration (``train_step.seconds``), the hooks between one step and the next, the
checkpoint hook, and from these medians (robust to other work on the machine, unlike
throughput) the ratio at the median step without a checkpoint and the ratio projected to a
checkpoint every ``--project-every`` steps (production default: 1000). The CPU-time ratio
(``process_time``, all threads) is also shown; OpenMP threads spinning while the cores are
shared inflate it as well. The model is the trainer's ``tiny://`` MusicGen at the scale of
``trainer_cpu.py``'s tiny LM: dim 256, 4 layers, 4 heads, 4 codebooks x 2048 cards (``--model``
to change it), random weights, nothing downloaded. (b) clips gradients (``gradientClip`` 1.0)
and (a), as the issue defines it, does not: ``--bare-clip`` adds the clipping to (a)::

    .venv/bin/python benchmarks/trainer_overhead.py                   # 3 reps, ~3-4 min on 2 cores
    .venv/bin/python benchmarks/trainer_overhead.py --reps 1 --steps 5 --warmup 2 --checkpoint-every 5
    .venv/bin/python benchmarks/trainer_overhead.py --json overhead.json --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_gpu import quiet_imports  # noqa: E402

from fermata_api import (  # noqa: E402
    DatasetSource,
    DatasetSpec,
    EvaluationSpec,
    ModelSpec,
    PodEnv,
    ReportingSpec,
    StorageSpec,
    TrainerConfig,
    TrainerState,
    TrainingSpec,
)
from fermata_dev.synthetic import synth_clip  # noqa: E402
from fermata_trainer.batching import BatchPlan, DataPosition  # noqa: E402
from fermata_trainer.codes_cache import CodesCache, CodesDataset, CodesSplit  # noqa: E402
from fermata_trainer.conditioning import apply_cfg_dropout, cfg_dropout_mask, make_attributes  # noqa: E402
from fermata_trainer.curation import audio_processor, processing_fingerprint  # noqa: E402
from fermata_trainer.dataset import AudioFetcher, ClipEntry, prepare_dataset  # noqa: E402
from fermata_trainer.logging_setup import configure_logging  # noqa: E402
from fermata_trainer.model_loading import LoadedModel, load_model  # noqa: E402
from fermata_trainer.optimization import build_optimizer  # noqa: E402
from fermata_trainer.prompts import augmented_prompt  # noqa: E402
from fermata_trainer.reporter import NullReporter  # noqa: E402
from fermata_trainer.storage import open_storage  # noqa: E402

#: trainer_cpu.py's tiny LM shape (dim 256, 4 layers, 4 heads, 4 x 2048 codes) as a tiny:// model;
#: dropout 0 so both sides compute the same losses (the tiny model's FFN is 2 x dim, not 4 x)
DEFAULT_MODEL = "tiny://seed=0,dim=256,layers=4,heads=4,bins=2048,dropout=0"
SAMPLE_RATE = 16000  # the tiny model's compression rate: the clips need no resampling
CPU = torch.device("cpu")

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


# ============================================================================ statistics


def spread(values: list[float]) -> dict[str, float]:
    """Median with its min and max (the figures every table row shows)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_spread(s: dict[str, float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    def f(v: float) -> str:
        return f"{v * scale:,.{digits}f}"

    return f"{f(s['median'])}{unit} [{f(s['min'])}-{f(s['max'])}]"


# ============================================================================ logging tap


class LogTap:
    """The stream the trainer's JSON log lines go to (``configure_logging(stream=...)``): each
    line is written to a file, as a pod's stdout is to its log, and kept with the
    ``perf_counter`` and ``process_time`` of its write while recording (the timed window is read
    from them)."""

    def __init__(self) -> None:
        self.file: TextIO | None = None
        self.lines: list[tuple[float, float, str]] = []
        self.recording = False

    def write(self, text: str) -> int:
        if self.recording:
            self.lines.append((time.perf_counter(), time.process_time(), text))
        return self.file.write(text) if self.file is not None else len(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    @contextlib.contextmanager
    def record(self, path: Path) -> Iterator[list[tuple[float, float, str]]]:
        self.lines = []
        with path.open("w") as fh:
            self.file, self.recording = fh, True
            try:
                yield self.lines
            finally:
                self.file, self.recording = None, False

    @staticmethod
    def events(lines: list[tuple[float, float, str]]) -> list[tuple[float, float, dict[str, Any]]]:
        out = []
        for wall, cpu, text in lines:
            for line in text.splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        out.append((wall, cpu, json.loads(line)))
        return out


# ============================================================================ data and config


@dataclass
class Setup:
    root: Path
    model_base: str
    manifest: Path
    cache_dir: Path
    batch_size: int
    segment_seconds: float
    checkpoint_every: int
    warmup: int
    steps: int
    seed: int = 1234
    heartbeat_seconds: float = 30.0

    def config(self, storage: Path, work_dir: Path, max_steps: int) -> TrainerConfig:
        """A CPU run of the production defaults where they do not change what is measured;
        evaluation only before and after the timed steps (its interval beyond the run)."""
        return TrainerConfig(
            model=ModelSpec(base=self.model_base),
            dataset=DatasetSpec(
                source=DatasetSource.manifest,
                uri=str(self.manifest),
                segment_seconds=self.segment_seconds,
                validation_fraction=0.1,
            ),
            training=TrainingSpec(
                epochs=10_000,
                max_steps=max_steps,
                batch_size=self.batch_size,
                checkpoint_every_steps=self.checkpoint_every,
                evaluate_every_steps=10**9,
                seed=self.seed,
            ),
            evaluation=EvaluationSpec(prompts=["deep amapiano with log drums"], clip_seconds=0.5),
            storage=StorageSpec(checkpoints=str(storage), keep_last=3, cache_uri=str(self.cache_dir)),
            reporting=ReportingSpec(heartbeat_seconds=self.heartbeat_seconds),
            gpus=0,
            work_dir=str(work_dir),
        )


def write_dataset(root: Path, clips: int, seconds: float) -> Path:
    """A generic JSONL manifest of ``clips`` synthetic 16 kHz WAV clips of ``seconds`` each,
    with BPM, key and tags (so prompt augmentation has something to vary)."""
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(clips):
        name = f"audio/clip-{i:03d}.wav"
        sf.write(str(root / name), synth_clip(i, seconds, SAMPLE_RATE), SAMPLE_RATE)
        lines.append(
            json.dumps(
                {
                    "audio": name,
                    "description": f"deep amapiano groove number {i} with log drums",
                    "bpm": 108 + i % 10,
                    "key": "A minor" if i % 2 else "F major",
                    "tags": ["amapiano", "log drum", "piano" if i % 3 else "bass"],
                }
            )
        )
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@dataclass
class Shards:
    """The tokenized dataset on disk and what reading it needs."""

    model: LoadedModel
    manifest_digest: str
    local_root: Path
    codes: CodesDataset
    meta: dict[str, ClipEntry]
    tokenize_seconds: float

    def cache(self, segment_seconds: float, cfg: TrainerConfig) -> CodesCache:
        curation = cfg.dataset.curation
        return CodesCache(
            self.model,
            self.manifest_digest,
            segment_seconds,
            self.local_root,
            None,
            processing=processing_fingerprint(curation),
            process=audio_processor(curation),
        )


def tokenize_once(setup: Setup) -> Shards:
    """The dataset manifest and its code shards, built by the trainer's own pieces as its
    tokenizing phase does, into a local cache folder mirrored to ``storage.cacheUri``: every
    trainer run below finds them there and only loads them."""
    prime = setup.root / "prime"
    cfg = setup.config(prime / "storage", prime / "work", max_steps=1)
    started = time.perf_counter()
    storage = open_storage(cfg.storage.checkpoints)
    prepared = prepare_dataset(cfg.dataset, storage, prime / "work")
    model = load_model(cfg.model.base, CPU, prime / "work")
    curation = cfg.dataset.curation
    cache = CodesCache(
        model,
        prepared.manifest_digest,
        setup.segment_seconds,
        prime / "work" / "codes",
        open_storage(str(setup.cache_dir)),
        processing=processing_fingerprint(curation),
        process=audio_processor(curation),
    )
    codes = cache.build(prepared.entries, AudioFetcher(prime / "work"), CPU, verify_checksums=True)
    return Shards(
        model=model,
        manifest_digest=prepared.manifest_digest,
        local_root=prime / "work" / "codes",
        codes=codes,
        meta={e.id: e for e in prepared.train},
        tokenize_seconds=time.perf_counter() - started,
    )


# ============================================================================ batches


def assemble_batch(
    lm: Any,
    train: CodesSplit,
    indices: list[int],
    step: int,
    epoch: int,
    tcfg: TrainingSpec,
    meta: dict[str, ClipEntry],
    sample_rate: int,
) -> Batch:
    """One micro-batch as ``Trainer._train_step`` prepares it before the model runs (rank 0 of
    one, no accumulation): codes to int64, padding masks, CFG dropout, the epoch's prompt
    variants, condition attributes and the conditioner's tokenization."""
    codes = train.codes[indices].to(device=CPU, dtype=torch.long)
    valid = train.masks[indices].to(CPU)
    drop = cfg_dropout_mask(len(indices), tcfg.cfg_dropout, tcfg.seed, step, 0)
    if tcfg.prompt_augmentation:
        prompts = []
        for i in indices:
            entry = meta.get(train.clip_ids[i])
            prompts.append(
                augmented_prompt(
                    train.prompts[i],
                    entry.tags if entry else (),
                    entry.bpm if entry else None,
                    entry.key if entry else None,
                    train.clip_ids[i],
                    epoch,
                    tcfg.seed,
                )
            )
    else:
        prompts = [train.prompts[i] for i in indices]
    attributes = make_attributes(lm, apply_cfg_dropout(prompts, drop), sample_rate)
    tokenized = lm.condition_provider.tokenize(attributes)
    return codes, valid, tokenized


def iterate_batches(
    lm: Any, codes: CodesDataset, tcfg: TrainingSpec, meta: dict[str, ClipEntry], sample_rate: int
) -> Iterator[Batch]:
    """The trainer's batches in its order, from the start of a run."""
    plan = BatchPlan(len(codes.train), tcfg.batch_size, tcfg.gradient_accumulation, 1, tcfg.seed)
    position = DataPosition()
    step = 0
    while True:
        for indices in plan.micro_batches(position, 0):
            yield assemble_batch(lm, codes.train, indices, step, position.epoch, tcfg, meta, sample_rate)
        position = plan.advance(position)
        step += 1


# ============================================================================ (a) the bare step


def audiocraft_cross_entropy() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]:
    """audiocraft's ``MusicGenSolver._compute_cross_entropy(logits, targets, mask)`` ->
    ``(loss, per-codebook losses)``; it does not use ``self``."""
    from audiocraft.solvers.musicgen import MusicGenSolver

    fn: Any = MusicGenSolver._compute_cross_entropy
    return lambda logits, targets, mask: fn(None, logits, targets, mask)


def bare_run(
    setup: Setup, shards: Shards, tcfg: TrainingSpec, work_dir: Path, clip: bool, optimizer_kind: str
) -> dict[str, Any]:
    """(a): a fresh copy of the same model (same seed, same weights), the same batches made in
    memory first, then ``warmup`` untimed and ``steps`` timed bare steps. The optimizer is
    torch's stock AdamW (``stock``) or the very one the trainer builds (``fermata``: its
    parameter groups, fused kernel), so the ratio is the loop's overhead alone."""
    model = load_model(setup.model_base, CPU, work_dir)
    lm: Any = model.lm
    lm.train()
    ce = audiocraft_cross_entropy()
    optimizer: torch.optim.Optimizer
    if optimizer_kind == "fermata":
        optimizer = build_optimizer(lm, tcfg.learning_rate, tcfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            [p for p in lm.parameters() if p.requires_grad],
            lr=tcfg.learning_rate,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=tcfg.weight_decay,
        )
    total = setup.warmup + setup.steps
    batches = iterate_batches(shards.model.lm, shards.codes, tcfg, shards.meta, model.sample_rate)
    made = [next(batches) for _ in range(total)]

    def step(batch: Batch) -> float:
        codes, valid, tokenized = batch
        optimizer.zero_grad(set_to_none=True)
        conditions = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], condition_tensors=conditions)
        mask = out.mask & valid[:, None, :]
        loss, _ = ce(out.logits, codes, mask)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(lm.parameters(), tcfg.gradient_clip)
        optimizer.step()
        return float(loss.detach())

    losses = [step(b) for b in made[: setup.warmup]]
    times = []
    window_start, cpu_start = time.perf_counter(), time.process_time()
    for batch in made[setup.warmup :]:
        started = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - started)
    window = time.perf_counter() - window_start
    cpu = time.process_time() - cpu_start
    return {
        "window_seconds": window,
        "steps_per_second": setup.steps / window,
        "cpu_seconds_per_step": cpu / setup.steps,
        "step_seconds": spread(times),
        "losses": losses,
        "parameters": sum(p.numel() for p in lm.parameters()),
    }


# ============================================================================ (b) Fermata's loop


def trainer_run(setup: Setup, tap: LogTap, run_dir: Path) -> dict[str, Any]:
    """(b): ``Trainer.run()`` for ``warmup + steps`` steps; the window read from its log lines."""
    from fermata_trainer.training_loop import Trainer

    total = setup.warmup + setup.steps
    cfg = setup.config(run_dir / "storage", run_dir / "work", max_steps=total)
    trainer = Trainer(cfg, PodEnv(), reporter=NullReporter())
    started = time.perf_counter()
    with (
        tap.record(run_dir / "trainer.log") as lines,
        (run_dir / "stderr.log").open("w") as err,
        contextlib.redirect_stderr(err),
    ):
        outcome = trainer.run()
    wall = time.perf_counter() - started
    if outcome.exit_code != 0 or outcome.state is not TrainerState.completed or outcome.step != total:
        raise RuntimeError(f"trainer run ended {outcome.state} at step {outcome.step} (see {run_dir})")
    events = LogTap.events(list(lines))
    step_at: dict[int, tuple[float, float]] = {}
    body: dict[int, float] = {}
    checkpoints: list[dict[str, Any]] = []
    statuses: list[float] = []
    source = None
    for wall_t, cpu_t, record in events:
        event = record.get("event")
        if event == "train_step":
            step_at[int(record["step"])] = (wall_t, cpu_t)
            body[int(record["step"])] = float(record["seconds"])
        elif event == "checkpoint_written":
            checkpoints.append({"time": wall_t, **record})
        elif event == "status":
            statuses.append(wall_t)
        elif event == "codes_ready":
            source = record.get("source")
    w, last = setup.warmup, setup.warmup + setup.steps
    (t0, c0), (t1, c1) = step_at[w], step_at[last]
    # interval k -> k+1: the hooks after step k (evaluation, checkpoint, report, the loop's
    # checks), then train step k+1, whose own duration its train_step line carries
    intervals = {k: step_at[k + 1][0] - step_at[k][0] for k in range(w, last)}
    hooks = {k: intervals[k] - body[k + 1] for k in intervals}
    ckpt_steps = [k for k in intervals if k % setup.checkpoint_every == 0]
    plain = [k for k in intervals if k not in ckpt_steps]
    in_window = [c for c in checkpoints if t0 <= c["time"] <= t1]
    return {
        "window_seconds": t1 - t0,
        "steps_per_second": setup.steps / (t1 - t0),
        "cpu_seconds_per_step": (c1 - c0) / setup.steps,
        "interval_seconds": spread(list(intervals.values())),
        "step_body_seconds": spread([body[k] for k in range(w + 1, last + 1)]),
        "plain_hook_seconds": spread([hooks[k] for k in plain]) if plain else None,
        "checkpoint_steps": ckpt_steps,
        "checkpoint_hook_seconds": [hooks[k] for k in ckpt_steps],
        "checkpoint_duration_seconds": [float(c["duration_seconds"]) for c in in_window],
        "checkpoint_serialize_seconds": [float(c["serialize_seconds"]) for c in in_window],
        "checkpoint_bytes": [int(c["bytes"]) for c in in_window],
        "status_reports_in_window": sum(1 for t in statuses if t0 < t <= t1),
        "run_wall_seconds": wall,
        "setup_seconds": step_at[1][0] - started - body[1],
        "codes_source": source,
        "losses": list(outcome.losses),
    }


# ============================================================================ the data loader


def loader_run(
    setup: Setup, shards: Shards, tcfg: TrainingSpec, cfg: TrainerConfig, batches: int
) -> dict[str, Any]:
    """The shards loaded from disk as a trainer run loads them, then ``batches`` batches made
    from them in the trainer's order with no model."""
    started = time.perf_counter()
    codes = shards.cache(setup.segment_seconds, cfg).load()
    load = time.perf_counter() - started
    if codes is None:
        raise RuntimeError(f"no code shards under {shards.local_root}")
    lm = shards.model.lm
    it = iterate_batches(lm, codes, tcfg, shards.meta, shards.model.sample_rate)
    for _ in range(3):  # warm-up
        next(it)
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - started
    return {
        "batches_per_second": batches / seconds,
        "batch_seconds": seconds / batches,
        "shard_load_seconds": load,
        "segments": len(codes.train) + len(codes.validation),
    }


# ============================================================================ main


@dataclass
class Figures:
    reps: list[dict[str, Any]] = field(default_factory=list)

    def values(self, *path: str) -> list[float]:
        out = []
        for rep in self.reps:
            value: Any = rep
            for key in path:
                value = value[key]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out.append(float(value))
        return out


def derive(result: dict[str, Any], project_every: int) -> None:
    """A repetition's ratios, (b) over (a), all as throughput ratios (above 1: b is faster)."""
    bare, trainer = result["bare"], result["trainer"]
    a_step = bare["step_seconds"]["median"]
    plain_hooks = trainer["plain_hook_seconds"]["median"] if trainer["plain_hook_seconds"] else 0.0
    b_plain = trainer["step_body_seconds"]["median"] + plain_hooks
    result["ratio"] = trainer["steps_per_second"] / bare["steps_per_second"]
    result["cpu_ratio"] = bare["cpu_seconds_per_step"] / trainer["cpu_seconds_per_step"]
    result["step_body_ratio"] = a_step / trainer["step_body_seconds"]["median"]
    result["plain_step_ratio"] = a_step / b_plain
    hooks = trainer["checkpoint_hook_seconds"]
    result["projected_ratio"] = (
        a_step / (b_plain + statistics.median(hooks) / project_every) if hooks else None
    )
    result["loader_over_trainer_steps"] = result["loader"]["batches_per_second"] / trainer["steps_per_second"]


def summarise(figs: Figures, tokens_per_step: int) -> dict[str, Any]:
    def per_rep(*path: str, scale: float = 1.0) -> dict[str, float] | None:
        values = figs.values(*path)
        return spread([v * scale for v in values]) if values else None

    def pooled(key: str) -> dict[str, float] | None:
        values = [float(v) for rep in figs.reps for v in rep["trainer"][key]]
        return spread(values) if values else None

    sizes = [int(v) for rep in figs.reps for v in rep["trainer"]["checkpoint_bytes"]]
    return {
        "bare_steps_per_second": per_rep("bare", "steps_per_second"),
        "trainer_steps_per_second": per_rep("trainer", "steps_per_second"),
        "bare_tokens_per_second": per_rep("bare", "steps_per_second", scale=tokens_per_step),
        "trainer_tokens_per_second": per_rep("trainer", "steps_per_second", scale=tokens_per_step),
        "ratio": per_rep("ratio"),
        "cpu_ratio": per_rep("cpu_ratio"),
        "step_body_ratio": per_rep("step_body_ratio"),
        "plain_step_ratio": per_rep("plain_step_ratio"),
        "projected_ratio": per_rep("projected_ratio"),
        "bare_step_seconds": per_rep("bare", "step_seconds", "median"),
        "trainer_step_body_seconds": per_rep("trainer", "step_body_seconds", "median"),
        "trainer_plain_hook_seconds": per_rep("trainer", "plain_hook_seconds", "median"),
        "checkpoint_hook_seconds": pooled("checkpoint_hook_seconds"),
        "checkpoint_duration_seconds": pooled("checkpoint_duration_seconds"),
        "checkpoint_bytes": int(statistics.median(sizes)) if sizes else None,
        "status_reports_in_window": per_rep("trainer", "status_reports_in_window"),
        "loader_batches_per_second": per_rep("loader", "batches_per_second"),
        "loader_over_trainer_steps": per_rep("loader_over_trainer_steps"),
        "shard_load_seconds": per_rep("loader", "shard_load_seconds"),
        "run_wall_seconds": per_rep("trainer", "run_wall_seconds"),
        "setup_seconds": per_rep("trainer", "setup_seconds"),
    }


def report(
    setup: Setup,
    args: argparse.Namespace,
    shards: Shards,
    figs: Figures,
    s: dict[str, Any],
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    codes = shards.codes
    t, k = codes.segment_frames, codes.num_codebooks
    params = figs.reps[0]["bare"]["parameters"]
    ckpts = len(figs.reps[0]["trainer"]["checkpoint_steps"])
    goal = s["ratio"]["median"] >= 0.95

    def row(label: str, value: dict[str, float] | None, note: str = "", **kw: Any) -> str:
        text = fmt_spread(value, **kw) if value is not None else "n/a"
        return f"{label:40}{text:>26}   {note}".rstrip()

    lines = [
        f"model            {setup.model_base} ({params / 1e6:.1f} M parameters, {k} codebooks x "
        f"{codes.cardinality} cards), fp32",
        f"machine          torch {torch.__version__}, {torch.get_num_threads()} CPU threads; load average "
        f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end (1 min)",
        f"batch            {setup.batch_size} x {t} frames ({setup.segment_seconds:g} s) x {k} codebooks = "
        f"{setup.batch_size * t * k} tokens/step; {len(codes.train)} train segments in the shards",
        f"timing           {setup.steps} timed steps after {setup.warmup} warm-up; median [min-max] of "
        f"{len(figs.reps)} repetitions, a and b alternated; (a) {'with' if args.bare_clip else 'without'} "
        "grad clipping, "
        f"{args.bare_optimizer} AdamW",
        f"trainer (b)      checkpoint every {setup.checkpoint_every} steps ({ckpts} in each window; local "
        f"storage, keep 3), NullReporter, heartbeat {setup.heartbeat_seconds:g} s, TensorBoard, JSON logs",
        "",
        f"{'':40}{'median [min-max]':>26}",
        row(
            "(a) bare step            steps/s",
            s["bare_steps_per_second"],
            "tokens/s " + fmt_spread(s["bare_tokens_per_second"], digits=0),
        ),
        row(
            "(b) Fermata loop         steps/s",
            s["trainer_steps_per_second"],
            "tokens/s " + fmt_spread(s["trainer_tokens_per_second"], digits=0),
        ),
        row("(b)/(a) throughput", s["ratio"], f"goal >= 0.95: {'met' if goal else 'NOT met'}", digits=3),
        row("(b)/(a) CPU time per step", s["cpu_ratio"], "process_time over the same windows", digits=3),
        row(
            "(b)/(a) median step, no checkpoint",
            s["plain_step_ratio"],
            "(a) median step / ((b) median body + hooks)",
            digits=3,
        ),
        row(
            f"(b)/(a) projected, ckpt every {args.project_every}",
            s["projected_ratio"],
            "the same plus the checkpoint hook / interval",
            digits=3,
        ),
        row(
            "(a) step                 ms",
            s["bare_step_seconds"],
            "median of each repetition",
            scale=1e3,
            digits=1,
        ),
        row(
            "(b) train step body      ms",
            s["trainer_step_body_seconds"],
            "Trainer._train_step + bookkeeping (its train_step log)",
            scale=1e3,
            digits=1,
        ),
        row(
            "(b) hooks, plain step    ms",
            s["trainer_plain_hook_seconds"],
            "log line to the next step: TensorBoard, reports, checks",
            scale=1e3,
            digits=2,
        ),
        row(
            "(b) checkpoint hook      s",
            s["checkpoint_hook_seconds"],
            f"{(s['checkpoint_bytes'] or 0) / 1e6:.0f} MB; its manifest says "
            + (fmt_spread(s["checkpoint_duration_seconds"]) if s["checkpoint_duration_seconds"] else "n/a")
            + " s",
        ),
        row(
            "data loader              batches/s",
            s["loader_batches_per_second"],
            "= " + fmt_spread(s["loader_over_trainer_steps"], digits=0) + " x (b)'s step rate",
            digits=0,
        ),
        row(
            "shard load               s",
            s["shard_load_seconds"],
            f"once per run ({figs.reps[0]['loader']['segments']} segments)",
            digits=3,
        ),
        row(
            "(b) whole run            s",
            s["run_wall_seconds"],
            "setup before step 1: " + fmt_spread(s["setup_seconds"], digits=1) + " s",
            digits=1,
        ),
        "",
        f"tokenized once in {shards.tokenize_seconds:.1f} s; the trainer runs loaded the codes from: "
        + ", ".join(sorted({str(r["trainer"]["codes_source"]) for r in figs.reps})),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions (each: a, b, loader)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them (>= 1)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--segment-seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint-every", type=int, default=30, help="trainer checkpoint interval (steps)")
    p.add_argument(
        "--project-every", type=int, default=1000, help="checkpoint interval to project (b)/(a) to"
    )
    p.add_argument("--clips", type=int, default=16, help="synthetic clips (2 segments each)")
    p.add_argument("--loader-batches", type=int, default=200, help="batches timed in the loader run")
    p.add_argument("--bare-clip", action="store_true", help="include grad clipping in (a), as (b) does")
    p.add_argument(
        "--bare-optimizer",
        choices=["stock", "fermata"],
        default="stock",
        help="(a)'s optimizer: torch's stock AdamW, or the trainer's own (build_optimizer: fused)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="tiny:// model both sides train")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.reps < 1:
        p.error("--warmup, --steps and --reps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_imports()
    tap = LogTap()
    configure_logging("INFO", stream=cast(Any, tap))

    load_start = os.getloadavg()
    root = args.keep or Path(tempfile.mkdtemp(prefix="fermata-overhead-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        setup = Setup(
            root=root,
            model_base=args.model,
            manifest=write_dataset(root / "data", args.clips, 2 * args.segment_seconds),
            cache_dir=root / "cache",
            batch_size=args.batch_size,
            segment_seconds=args.segment_seconds,
            checkpoint_every=args.checkpoint_every,
            warmup=args.warmup,
            steps=args.steps,
        )
        with tap.record(root / "tokenize.log"):
            shards = tokenize_once(setup)
        cfg = setup.config(root / "unused", root / "unused", max_steps=1)
        tcfg = cfg.training
        figs = Figures()
        for rep in range(args.reps):
            run_dir = root / f"rep-{rep}"
            run_dir.mkdir(parents=True, exist_ok=True)
            result: dict[str, Any] = {}
            order = ("bare", "trainer") if rep % 2 == 0 else ("trainer", "bare")
            for side in order:
                if side == "bare":
                    with tap.record(root / f"bare-{rep}.log"):
                        result["bare"] = bare_run(
                            setup, shards, tcfg, run_dir / "bare", args.bare_clip, args.bare_optimizer
                        )
                else:
                    result["trainer"] = trainer_run(setup, tap, run_dir)
                    shutil.rmtree(run_dir / "storage", ignore_errors=True)  # ~0.1 GB per checkpoint
            with tap.record(root / f"loader-{rep}.log"):
                result["loader"] = loader_run(setup, shards, tcfg, cfg, args.loader_batches)
            result["order"] = list(order)
            derive(result, args.project_every)
            figs.reps.append(result)
            print(
                f"rep {rep + 1}/{args.reps}: (a) {result['bare']['steps_per_second']:.3f} steps/s, "
                f"(b) {result['trainer']['steps_per_second']:.3f} steps/s, (b)/(a) {result['ratio']:.3f}, "
                f"loader {result['loader']['batches_per_second']:,.0f} batches/s",
                flush=True,
            )
        tokens_per_step = setup.batch_size * shards.codes.segment_frames * shards.codes.num_codebooks
        summary = summarise(figs, tokens_per_step)
        load = (load_start, os.getloadavg())
        print()
        print(report(setup, args, shards, figs, summary, load))
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "settings": {
                            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        },
                        "model": setup.model_base,
                        "torch": torch.__version__,
                        "threads": torch.get_num_threads(),
                        "tokens_per_step": tokens_per_step,
                        "segment_frames": shards.codes.segment_frames,
                        "train_segments": len(shards.codes.train),
                        "tokenize_seconds": shards.tokenize_seconds,
                        "load_average": {"start": load[0], "end": load[1]},
                        "summary": summary,
                        "repetitions": figs.reps,
                    },
                    indent=2,
                )
            )
            print(f"\nfigures written to {args.json}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

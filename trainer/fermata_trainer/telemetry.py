"""What the trainer measures besides losses: GPU use, TensorBoard events, a progress bar.

* :class:`GpuMonitor` — NVML utilisation (mean of the samples taken since the last report) and
  memory in use, when an NVIDIA driver is present; ``None`` otherwise.
* :class:`TensorBoardSink` — ``SummaryWriter`` event files in the work dir, mirrored to
  ``<storage>/tensorboard/`` whenever :meth:`TensorBoardSink.sync` runs. The training loop
  writes ``train/*`` every step, ``validation/*`` and ``authenticity/*`` at evaluations, and at
  every status report ``gpu/utilization`` and ``gpu/memory_bytes`` (only when NVML has values)
  and ``cost/accrued_usd`` (only once a reply from the API carried ``status.cost``).
  ``kubectl fermata tensorboard NAME`` mirrors and serves them.
* :class:`ProgressBar` — tqdm with ETA, only when stderr is a terminal (pod logs stay clean).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from fermata_trainer.logging_setup import get_logger
from fermata_trainer.storage import Storage

log = get_logger(__name__)


class GpuMonitor:
    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._util_sum = 0.0
        self._samples = 0
        try:
            import pynvml

            pynvml.nvmlInit()
            count = int(pynvml.nvmlDeviceGetCount())
            indices = list(range(count))
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            if visible and all(p.strip().isdigit() for p in visible.split(",")):
                indices = [int(p) for p in visible.split(",") if int(p) < count]
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            self._nvml = pynvml
        except Exception:
            self._nvml = None
            self._handles = []

    @property
    def available(self) -> bool:
        return self._nvml is not None and bool(self._handles)

    def sample(self) -> None:
        """Take one utilisation sample (cheap; call once per step)."""
        if not self.available:
            return
        try:
            rates = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
        except Exception:
            return
        self._util_sum += sum(rates) / (100.0 * len(rates))
        self._samples += 1

    def snapshot(self) -> tuple[float | None, int | None]:
        """Mean utilisation (0..1) since the last snapshot and memory in use (bytes)."""
        if not self.available:
            return None, None
        if self._samples == 0:
            self.sample()
        utilization = self._util_sum / self._samples if self._samples else None
        self._util_sum, self._samples = 0.0, 0
        try:
            memory = int(sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles))
        except Exception:
            memory = None
        if utilization is not None:
            utilization = min(1.0, max(0.0, utilization))
        return utilization, memory

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


class TensorBoardSink:
    """Scalars to TensorBoard event files, mirrored to storage on :meth:`sync`."""

    def __init__(self, local_dir: Path, mirror: Storage | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        local_dir.mkdir(parents=True, exist_ok=True)
        self.local_dir = local_dir
        self.mirror = mirror
        self.writer = SummaryWriter(log_dir=str(local_dir))
        self._uploaded: dict[str, int] = {}

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, float(value), global_step=step)

    def text(self, step: int, name: str, value: str) -> None:
        self.writer.add_text(name, value, global_step=step)

    def sync(self) -> None:
        self.writer.flush()
        if self.mirror is None:
            return
        for path in sorted(self.local_dir.rglob("*")):
            if not path.is_file():
                continue
            key = path.relative_to(self.local_dir).as_posix()
            size = path.stat().st_size
            if self._uploaded.get(key) == size:
                continue
            try:
                self.mirror.upload_file(path, key)
                self._uploaded[key] = size
            except Exception as exc:  # mirrored again at the next sync
                log.warning("tensorboard_mirror_failed", file=key, error=str(exc)[:300])

    def close(self) -> None:
        self.sync()
        self.writer.close()


class ProgressBar:
    """A tqdm bar with ETA on a TTY; nothing otherwise (the JSON logs carry the same facts)."""

    def __init__(self, total: int, initial: int, enabled: bool | None = None) -> None:
        self._bar: Any = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, loss: float | None = None) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

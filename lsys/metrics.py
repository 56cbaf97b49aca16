"""What a run reports: JSON lines in run_dir/metrics.jsonl, and a live view on rank 0 (a rich progress bar
on a terminal, one plain line per log interval elsewhere, e.g. in CI or Ray job logs)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank so far: allocator peak on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def resident_bytes() -> int:
    """Memory this process holds alone: its unique set size (shared pages such as Ray's object store left out),
    after handing the allocator's free pages back to the OS (glibc keeps them otherwise, e.g. those of the full
    model built before sharding)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_full_info().uss


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class MetricsWriter:
    """Appends one JSON object per line. A run resumed from step N first drops the records of steps after N
    (written before the interruption, about to be trained again), so every step appears once."""

    def __init__(self, path: Path, resumed_from: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_from]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self._file = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressView:
    """Rank 0's view of the run. Other ranks get a view whose methods do nothing."""

    def __init__(self, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        # Off a terminal (CI, Ray job logs) lines must not be wrapped at an assumed 80 columns.
        self.console = Console(stderr=True, soft_wrap=True)
        self.live = enabled and self.console.is_terminal
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("peak {task.fields[mem]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 loss="-", tps="-", mem="-")
            self._progress.start()

    def step(self, step: int, record: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            fields = {}
            if record is not None:
                fields = {"loss": f"{record['loss']:.4f}", "tps": f"{record['tokens_per_s']:,.0f}",
                          "mem": format_bytes(max(record["peak_memory_bytes"]))}
            self._progress.update(self._task, completed=step, **fields)
        elif record is not None:
            self.console.print(
                f"step {step:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}"
                f"  {record['tokens_per_s']:,.0f} tok/s  peak {format_bytes(max(record['peak_memory_bytes']))}",
                highlight=False,
            )

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

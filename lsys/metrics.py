"""What a run reports: JSON lines in run_dir/metrics.jsonl, and a live view on rank 0 (a rich progress bar
on a terminal, one plain line per log interval elsewhere, e.g. in CI or Ray job logs)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: on CUDA the allocator's peak since it was last reset (`PeakMemory`); on CPU the
    process's peak resident set size since it started, which cannot be reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class PeakMemory:
    """This rank's peak memory in the current step and over the run.

    On CUDA the allocator's peak is reset when a step starts, so a step's figure is that step's own, the figure
    `lsys plan` predicts (the allocator never resets it itself: it would otherwise be the run's largest so far).
    On CPU the peak resident set size cannot be reset: a step's figure is the process's peak since it started,
    at least the step's, and equal to the run's.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._earlier = 0  # the largest peak of the steps before the last reset (CUDA)

    def start_step(self) -> None:
        if self.device.type == "cuda":
            self._earlier = self.over_run()
            torch.cuda.reset_peak_memory_stats(self.device)

    def in_step(self) -> int:
        """Since the step started (on CUDA; see the class)."""
        return peak_memory_bytes(self.device)

    def over_run(self) -> int:
        return max(self._earlier, peak_memory_bytes(self.device))


def resident_bytes() -> int:
    """Memory this process holds alone: its unique set size (shared pages such as Ray's object store left out),
    after handing the allocator's free pages back to the OS (glibc keeps them otherwise, e.g. those of the full
    model built before sharding)."""
    import psutil  # here, not at the top: importing the trainer (a run's steps) needs no psutil, only this does

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
    (written before the interruption, about to be trained again), so every step appears once; the file is then
    rewritten atomically (a new file renamed over it).

    An interrupted run (a kill, a full disk) can leave a partial last line: it is dropped, and said on stderr.
    A line before the last that is not a JSON object was not left by an interruption (an edit, a second writer, a
    damaged disk): the file is the user's record, so the original is first copied byte for byte beside it as
    `metrics.jsonl.bad-<time>`, said on stderr, and the run continues with the readable records.
    """

    def __init__(self, path: Path, resumed_from: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            scan = _scan(path)
            if scan.partial_bytes:
                print(f"lsys: {path.name}: dropped a partial last line ({scan.partial_bytes} bytes) left by an "
                      "interrupted run", file=sys.stderr, flush=True)
            if scan.bad_lines:
                aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.copy2(path, aside)
                more = f" (and {len(scan.bad_lines) - 1} more)" if len(scan.bad_lines) > 1 else ""
                print(f"lsys: {path}: line {scan.bad_lines[0]}{more} is not a JSON record; the file as it was is "
                      f"kept in {aside}, and the run goes on with its {len(scan.records)} readable records",
                      file=sys.stderr, flush=True)
            kept = [line for record, line in scan.records if record.get("step", 0) <= resumed_from]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(b"".join(line + b"\n" for line in kept))
            tmp.replace(path)
        self._file = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file, also while a run is writing it: a partial last line (being written, or left
    by an interrupted run) is left out. A line before it that is not a JSON object raises ValueError."""
    scan = _scan(path)
    if scan.bad_lines:
        raise ValueError(f"{path}:{scan.bad_lines[0]}: not a JSON record; repair or delete that line (resuming the "
                         "run does it, keeping the original file beside it as metrics.jsonl.bad-<time>)")
    return [record for record, _ in scan.records]


@dataclass
class _Scan:
    records: list[tuple[dict[str, Any], bytes]]  # each readable record with its line as written
    bad_lines: list[int]  # line numbers (from 1) before the last line that are not JSON objects
    partial_bytes: int  # length of an unreadable last line, 0 when the last line is readable


def _scan(path: Path) -> _Scan:
    # Bytes, not text: a cut can split a character, and the dropped line is reported in bytes.
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    scan = _Scan([], [], 0)
    for number, line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            record = None
        if isinstance(record, dict):
            scan.records.append((record, line))
        elif number == lines[-1][0]:
            scan.partial_bytes = len(line)
        else:
            scan.bad_lines.append(number)
    return scan


def _shown(value: float | None, spec: str) -> str:
    """A logged number; None stands for a value that was not finite (JSON has no NaN)."""
    return "not finite" if value is None else format(value, spec)


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
                fields = {"loss": _shown(record["loss"], ".4f"), "tps": f"{record['tokens_per_s']:,.0f}",
                          "mem": format_bytes(max(record["peak_memory_bytes"]))}
            self._progress.update(self._task, completed=step, **fields)
        elif record is not None:
            skipped = "  (skipped: not finite)" if record.get("skipped") else ""
            self.console.print(
                f"step {step:>6}  loss {_shown(record['loss'], '.4f')}  lr {record['lr']:.2e}  grad_norm "
                f"{_shown(record['grad_norm'], '.3f')}  {record['tokens_per_s']:,.0f} tok/s  "
                f"peak {format_bytes(max(record['peak_memory_bytes']))}{skipped}",
                highlight=False,
            )

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

"""Measure every rank's memory over real training steps (`lsys profile`).

Each rank builds the trainer exactly as `lsys train` does and runs full-length steps under `MemoryTracker`, which
breaks the memory down by category and by layer. On CUDA the caching allocator is read as well, independently of
the tracker: its peak allocated and reserved bytes, and a memory-history snapshot per rank for PyTorch's memory
viewer (https://pytorch.org/memory_viz). The CPU allocator keeps no such statistics (torch.profiler's allocation
events were tried: they are per thread, and the communication backend allocates on its own threads, so they
drift by about 10% either way from run to run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lsys.config import LsysConfig, config_from_dict
from lsys.memory.tracker import MemoryTracker
from lsys.session import distributed_session
from lsys.trainer import Trainer
from lsys.validation import validate_for_world
from parallel._compat import cuda_memory_history

SNAPSHOT_ENTRIES = 200_000  # allocation events the CUDA memory history keeps


def full_length(cfg: LsysConfig) -> LsysConfig:
    """Profiles and plans are about data.seq_len: no sequence-length warmup."""
    return replace(cfg, data=replace(cfg.data, curriculum=replace(cfg.data.curriculum, start_len=0)))


@contextlib.contextmanager
def _cuda_allocator(found: dict[str, Any], device: torch.device, snapshot: Path) -> Iterator[None]:
    torch.cuda.reset_peak_memory_stats(device)
    with cuda_memory_history(str(snapshot), SNAPSHOT_ENTRIES):
        yield
    found["allocator_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    found["allocator_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
    found["snapshot"] = snapshot.name


def profile_rank(values: dict[str, Any], steps: int, out_dir: str) -> dict[str, Any]:
    """Entry point of each spawned rank: `steps` training steps of the config in `values`; returns this rank's
    record for memory.json."""
    cfg = full_length(config_from_dict(values))
    with distributed_session(cfg.train.device, cfg.train.collective_timeout_s) as session:
        validate_for_world(cfg, session.world_size)
        trainer = Trainer(cfg, session)
        tracker = MemoryTracker(trainer.model, trainer.optimizer, host_state=cfg.parallel.fsdp_offload != "none")
        trainer.work.probe = tracker
        found: dict[str, Any] = {}
        snapshot = Path(out_dir, f"memory_snapshot_rank{session.rank}.pickle")
        on_cuda = session.device.type == "cuda"
        watch = _cuda_allocator(found, session.device, snapshot) if on_cuda else contextlib.nullcontext()
        with watch, tracker:
            for step in range(steps):
                trainer.train_step(step)
        return {"rank": session.rank, "device": session.device.type, **tracker.usage().to_dict(), **found}

"""Checkpoints with torch.distributed.checkpoint, written atomically.

Every rank writes its shard into `step_XXXXXXXX.tmp/` (with an offloaded optimizer, also its optimizer state as
`optimizer_rankNNNNN.pt`, which resumes only on the same layout); after a barrier rank 0 renames the directory to
`step_XXXXXXXX/`. A rename is atomic, so a directory without `.tmp` is always complete, and a run killed
mid-write leaves only a `.tmp` that resume ignores (and the next save of that step replaces).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lsys.optim import OffloadedAdamW

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    progress = {"step": torch.tensor(step)}
    if isinstance(optimizer, OffloadedAdamW):  # its state is per rank, in _rank_file
        return {"model": get_model_state_dict(model), "progress": progress}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state, "progress": progress}


def _rank_file(directory: Path) -> Path:
    return directory / f"optimizer_rank{dist.get_rank():05d}.pt"


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, keep_last: int, meta: dict
) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_app_state(model, optimizer, step), checkpoint_id=tmp)
    if isinstance(optimizer, OffloadedAdamW):
        torch.save(optimizer.rank_state(), _rank_file(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "lsys_meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Collective: restore model and optimizer in place (any data-parallel layout); returns the saved step."""
    state = _app_state(model, optimizer, step=-1)
    dcp.load(state, checkpoint_id=path)
    if isinstance(optimizer, OffloadedAdamW):
        set_model_state_dict(model, state["model"])
        if not _rank_file(path).is_file():
            raise ValueError(f"{path} has no offloaded optimizer state for rank {dist.get_rank()}: it was saved "
                             "with another optim.offload or number of ranks; resume with those")
        optimizer.load_rank_state(torch.load(_rank_file(path), weights_only=True))
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(state["progress"]["step"])

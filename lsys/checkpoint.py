"""Checkpoints with torch.distributed.checkpoint: written atomically, verified before use, loaded without pickle.

What a checkpoint `step_XXXXXXXX/` promises: it holds the model, optimizer and step exactly as they were after
that step (with an offloaded optimizer, each rank's state in `optimizer_rankNNNNN.pt`, which resumes only on the
same number of ranks), and its `manifest.json` records every file's size and sha256, the model shape, the layout
and the config it was trained with. Writing: every rank writes into `step_XXXXXXXX.tmp/`; after a barrier rank 0
hashes the files into the manifest (written atomically, last) and renames the directory. A run killed mid-write
leaves a `.tmp` (ignored, replaced by the next save of that step) or a directory without a manifest (skipped).

Resuming (lsys.checkpoint_verify): the newest checkpoint whose files all match their manifest and whose model
shape matches the config is loaded; newer damaged ones are skipped with a reason; if none is usable, a ValueError
says why and nothing is loaded. Loading never runs full pickle: `.metadata` goes through a restricted unpickler,
and the small non-tensor values in the shards (optimizer hyperparameters) through `torch.load(weights_only=True)`.

Pruning (keep_last), at each save after the rename: the checkpoint just written is never deleted (it was hashed
from the files it lists, so it is the newest verified one). Of the others, those whose manifest parses and whose
listed files all have their recorded sizes count as verified (no rehashing at every save); the newest
keep_last - 1 of them by step are kept and the older verified ones deleted. Checkpoints that fail that check
(damaged, or without a manifest) are neither counted nor deleted: they are reported at resume for the user.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from lsys.checkpoint_verify import (
    Unusable,
    check_files,
    checkpoints_by_step,
    fsync_dir,
    load_dcp_metadata,
    read_manifest,
    write_manifest,
)
from lsys.optim import TrainingOptimizer
from parallel._compat import set_element


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by the restricted unpickler (torch's uses full pickle)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Same contract as FileSystemReader.read_metadata in torch 2.13: per-rank file when `rank` is given, and
        # the load id stamped into storage_meta.
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_dcp_metadata(stream, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but non-tensor values are unpickled with torch's restricted (weights_only) loader;
    the default uses full pickle. Ours are plain numbers, tuples and strings (optimizer param_groups)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _app_state(model: nn.Module, optimizer: TrainingOptimizer, step: int) -> dict:
    # Keys "model", "optimizer" (a local optimizer's; an offloaded one's state is per rank, in _rank_file) and
    # "progress": the checkpoint format.
    return {"model": get_model_state_dict(model), **optimizer.checkpoint_state(model),
            "progress": {"step": torch.tensor(step)}}


def _rank_file(directory: Path) -> Path:
    return directory / f"optimizer_rank{dist.get_rank():05d}.pt"


def prunable(root: Path, keep: Path, keep_last: int) -> list[Path]:
    """The checkpoints keep_last allows deleting now that `keep` was written (the rule: module docstring)."""
    verified = []
    for _, path in reversed(checkpoints_by_step(root)):
        if path == keep:
            continue
        try:
            check_files(path, read_manifest(path), hashes=False)
        except Unusable:
            continue
        verified.append(path)
    return verified[keep_last - 1:]


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: TrainingOptimizer, keep_last: int,
                    *, shape: dict, layout: dict, config: dict) -> Path:
    """Collective: every rank calls it. `shape`, `layout` and `config` (lsys.checkpoint_verify.model_shape,
    run_layout, the config dict) go into the manifest. Returns the final directory."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_app_state(model, optimizer, step), checkpoint_id=tmp)  # fsyncs its shards (sync_files=True)
    if optimizer.per_rank_state:
        with _rank_file(tmp).open("wb") as f:
            torch.save(optimizer.rank_state(), f)
            f.flush()
            os.fsync(f.fileno())
    dist.barrier()
    if dist.get_rank() == 0:
        write_manifest(tmp, step, shape, layout, config)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        for old in prunable(root, final, keep_last):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: TrainingOptimizer) -> int:
    """Collective: restore model and optimizer in place (any data-parallel layout); returns the saved step.
    `path` must have been chosen by lsys.checkpoint_verify.select_checkpoint (verified, of this model's shape)."""
    state = _app_state(model, optimizer, step=-1)
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=_WeightsOnlyLoadPlanner())
    optimizer.load_checkpoint_state(model, state)  # before the model, the order of torch's set_state_dict
    set_model_state_dict(model, state["model"])
    if optimizer.per_rank_state:
        if not _rank_file(path).is_file():
            raise ValueError(f"{path} has no offloaded optimizer state for rank {dist.get_rank()}: it was saved "
                             "with another optim.offload or number of ranks; resume with those")
        optimizer.load_rank_state(torch.load(_rank_file(path), weights_only=True))
    return int(state["progress"]["step"])


def read_model_tensors(path: Path, specs: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Whole tensors of the model state in checkpoint `path` for the names in `specs` (name -> (shape, stored
    dtype), as its `.metadata` lists them; names without the `model.` prefix), read in this process alone: no
    process group, whatever layout wrote the shards. Only the named tensors are read, so a caller streams a
    large model a few tensors at a time. `path` must have been verified (lsys.checkpoint_verify)."""
    state = {"model": {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}}
    # Checkpoint entries missing from `state` (the optimizer's, other tensors) are simply not read. torch warns
    # that it assumes one process when no group exists: here that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=_WeightsOnlyLoadPlanner(), no_dist=True)
    return state["model"]

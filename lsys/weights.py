"""Giving a parallelized model built on the meta device its values, each rank filling only its own shards.

    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    parallelize(model, ...)
    materialize(model, device, seed=cfg.train.seed, pretrained=cfg.model.pretrained)

A rank holds its shards and, while loading, one tensor in flight: for a random start the full float32 values
of one parameter (drawn on CPU, in one fixed order, so every layout gets the same model as `build_model`); from
a pretrained checkpoint only this rank's box of each tensor, sliced out of the memory-mapped safetensors file
(the file's pages, not a copy) and converted to the parameter's dtype on the way into the shard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lsys.hf.checkpoint import StoredTensor, match_checkpoint
from parallel.shards import fill_shard


def materialize(model: nn.Module, device: torch.device, *, seed: int, pretrained: str = "") -> nn.Module:
    """Allocate `model`'s shards on `device` and fill them: from the HuggingFace checkpoint directory
    `pretrained` (its headers checked first), else randomly from `seed`. Returns the model."""
    stored = match_checkpoint(model.cfg, pretrained) if pretrained else None
    model.to_empty(device=device)
    model.tie_weights()
    if stored is None:
        for name, values in model.initial_values(seed):
            fill_shard(model.get_parameter(name), lambda box, v=values: v[box.index])
            del values  # before the next is drawn: the loop would hold it until then
    else:
        _fill_from_safetensors(model, stored)
    return model


def _fill_from_safetensors(model: nn.Module, stored: dict[str, StoredTensor]) -> None:
    by_file: dict[Path, list[str]] = {}
    for name, tensor in stored.items():
        by_file.setdefault(tensor.file, []).append(name)
    for file, names in by_file.items():
        # One file open at a time; a slice is a view of its mapping, read from disk as it is copied.
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                view = f.get_slice(stored[name].name)
                fill_shard(model.get_parameter(name), lambda box, v=view: v[box.index])

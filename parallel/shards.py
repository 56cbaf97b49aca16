"""Which part of a parameter's full tensor this rank holds, and filling that part: how a model built on the meta
device and parallelized gets its values without any rank ever holding a whole model.

A parameter after `parallelize()` is a plain tensor (held whole), a tensor-parallel DTensor, an FSDP2-sharded
DTensor, or both (replica x tp, FSDP2's strided sharding of the tensor-parallel shard). Whatever the placements,
a rank's local tensor is one box of the full tensor: an offset and a size along each dimension (what
torch.distributed.checkpoint plans its reads with). A replicated DTensor's box is the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from parallel._compat import shard_position


@dataclass(frozen=True)
class ShardBox:
    """This rank's part of a full tensor of `shape`: `sizes` elements from `offsets` along each dimension."""

    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def index(self) -> tuple[slice, ...]:
        """The box as a basic index of the full tensor (`full[box.index]` is the shard)."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True))

    @property
    def numel(self) -> int:
        return int(torch.Size(self.sizes).numel())


def local_tensor(param: Tensor) -> Tensor:
    """This rank's shard of `param` as a plain tensor sharing its storage (writes land in the parameter)."""
    if not isinstance(param, DTensor):
        return param.data
    with torch.no_grad():
        return param.to_local()


def shard_box(param: Tensor) -> ShardBox:
    shape = tuple(param.shape)
    if not isinstance(param, DTensor):
        return ShardBox(shape, (0,) * len(shape), shape)
    sizes, offsets = shard_position(param)
    held = tuple(local_tensor(param).shape)
    if tuple(sizes) != held:  # a placement whose shard is not one box: refuse rather than fill it wrongly
        raise RuntimeError(f"a parameter of shape {shape} with placements {param.placements}: its local shard "
                           f"{held} is not the box {tuple(sizes)} at {tuple(offsets)}")
    return ShardBox(shape, tuple(offsets), tuple(sizes))


def fill_shard(param: Tensor, read: Callable[[ShardBox], Tensor]) -> None:
    """Copy `read(box)` (the values of this rank's box of the full tensor, any dtype) into `param`'s shard. A rank
    whose box is empty (FSDP2's last shards of a short dimension) reads nothing."""
    box = shard_box(param)
    if box.numel == 0:
        return
    values = read(box)
    if tuple(values.shape) != box.sizes:
        raise RuntimeError(f"read {tuple(values.shape)} for the box {box.sizes} at {box.offsets} of {box.shape}")
    with torch.no_grad():
        local_tensor(param).copy_(values)

"""Activation recomputation per block: `none`, `selective` (Megatron-style), or `full`.

- full: a block keeps only its inputs; its whole forward, context-parallel attention included (so ring K/V
  travel again), runs a second time during backward.
- selective: a block keeps its matmul outputs and its attention's own saved tensors (out and lse, q and the
  K/V blocks for ring attention) and recomputes only the cheap elementwise parts (norms, RoPE, SiLU, products,
  residual adds). Attention is never run again: its output is replayed from the forward, so a recompute never
  repeats ring or Ulysses communication.

Selective is torch's non-reentrant checkpoint with our own selective cache (a pair of dispatch modes, as
torch's selective-checkpoint contexts are) that knows the block's structure. It keeps matmul outputs that
backward's recompute reads, and stores none of these:
  - the q/k/v projections: they feed only attention, which is replayed, so the recompute gets zeros of the
    right shape (RoPE's backward needs only its tables, each projection's backward its input); unless the
    block's plan says backward reads them (per-head norms between them and attention): then they are kept;
  - the feed-forward's output projection: it feeds only the residual add, and the checkpoint stops
    recomputing once every saved tensor is back, before it is reached;
  - matmuls run with grad mode off: they save nothing for backward. A region that recomputes itself in
    backward (a feed-forward tiled along the sequence, lsys.tiling: an autograd Function, whose forward runs
    without grad) thus keeps only its input, not its [S, ffn_hidden] projections, which would undo the
    tiling; and as that input is the last tensor the block saves, the recompute stops before the region runs.
With 8-bit stored activations on, the kept outputs and the block's kept input (selective and full) are stored
int8 (parallel.quantize) like attention's.
Attention runs inside the checkpointed region but outside its bookkeeping: saved-tensor hooks restored to
plain saving, no caching, and its output remembered for the replay.
With recompute.offload=cpu everything a block keeps this way (its inputs, the cache, attention's tensors and
replayed output, int8 or not) goes to the block's host storage (parallel.offload) instead.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from parallel._compat import TorchDispatchMode, in_backward
from parallel.config import RecomputeConfig
from parallel.offload import BlockStorage
from parallel.plan import BlockPlan, ParallelPlan
from parallel.quantize import BlockQuantizer
from parallel.transforms import mark_applied

# Matmul outputs are kept: recomputing them would cost as much as the forward's matmuls.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten.linear.default}


class _ReplayedAttention:
    """Wraps a block's attn_fn: runs it normally in forward and hands back the same output when the
    checkpoint recomputes the block during backward (detected by running inside the autograd engine)."""

    def __init__(self, attn_fn: Callable[..., Tensor], pack: Callable[[Tensor], Any],
                 saving: Callable[[], contextlib.AbstractContextManager]):
        self.attn_fn = attn_fn
        self.pack = pack  # how the output is kept until the replay: itself, or the int8 copy attention saved
        self.saving = saving  # how attention's own tensors are saved: plainly, or moved to host memory
        self.outputs: deque[Any] = deque()
        self.running = False  # the selective cache leaves ops inside attention alone
        self.preparing_inputs = False  # between the attention module's start and attn_fn: q/k/v projections

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.preparing_inputs = False
        if in_backward():
            # A dequantized copy is a new leaf: it must require grad as the output did, so the recompute
            # saves what the forward saved (the output projection keeps its weight only for such an input).
            return _unpacked(self.outputs.popleft()).requires_grad_()
        self.running = True
        try:
            # Attention's own tensors live until backward, not recomputed: out of the checkpoint's bookkeeping.
            with self.saving():
                out = self.attn_fn(*args, **kwargs)
        finally:
            self.running = False
        if torch.is_grad_enabled():
            self.outputs.append(self.pack(out))
        return out


class _Placeholder:
    """A matmul output backward never reads: only its layout is kept, zeros stand in on recompute.
    Under tensor parallelism the output is a DTensor: its local layout and its sharding are kept."""

    def __init__(self, t: Tensor):
        local = t.to_local() if isinstance(t, DTensor) else t
        self.size, self.stride, self.dtype, self.device = local.size(), local.stride(), local.dtype, local.device
        self.spec = (t.device_mesh, t.placements, t.shape, t.stride()) if isinstance(t, DTensor) else None

    def unpack(self) -> Tensor:
        zeros = torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=self.device).zero_()
        if self.spec is None:
            return zeros
        mesh, placements, shape, stride = self.spec
        return DTensor.from_local(zeros, mesh, placements, run_check=False, shape=shape, stride=stride)


_RECOMPUTE = object()


def _unpacked(kept: Any) -> Tensor:
    return kept.unpack() if hasattr(kept, "unpack") else kept


class _SelectiveCache:
    """What one checkpointed forward of a block keeps for its recompute: matmul outputs, per op in call order.

    `pack` turns a kept output into what is stored (itself, or an int8 copy with `.unpack()`).
    """

    def __init__(self, attention: _ReplayedAttention, final_projection: _ModuleFlag,
                 pack: Callable[[Tensor], Any]):
        self.attention = attention
        self.final_projection = final_projection
        self.pack = pack
        self.entries: dict[Any, list] = defaultdict(list)
        self.taken: dict[Any, int] = defaultdict(int)

    def keep(self, func: Any, out: Tensor) -> None:
        if self.attention.preparing_inputs:
            entry = _Placeholder(out)
        elif self.final_projection.active:
            entry = _RECOMPUTE
        else:
            entry = self.pack(out.detach())
        self.entries[func].append(entry)

    def take(self, func: Any) -> Any:
        index = self.taken[func]
        self.taken[func] += 1
        entry, self.entries[func][index] = self.entries[func][index], None
        return entry

    def contexts(self) -> tuple[TorchDispatchMode, TorchDispatchMode]:
        return _Recording(self), _Replaying(self)


class _Recording(TorchDispatchMode):
    def __init__(self, cache: _SelectiveCache):
        super().__init__()
        self.cache = cache

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and not self.cache.attention.running and torch.is_grad_enabled():
            self.cache.keep(func, out)
        return out


class _Replaying(TorchDispatchMode):
    def __init__(self, cache: _SelectiveCache):
        super().__init__()
        self.cache = cache

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS and torch.is_grad_enabled():
            entry = self.cache.take(func)
            if entry is None:
                raise RuntimeError("selective recompute: a block's forward was recomputed twice "
                                   "(a second backward through it needs recompute.mode=full or retain_graph off)")
            if entry is not _RECOMPUTE:
                return _unpacked(entry)
        return func(*args, **(kwargs or {}))


class _ModuleFlag:
    """True while a module's forward runs (set by hooks on it)."""

    def __init__(self, module: nn.Module):
        self.active = False
        module.register_forward_pre_hook(lambda *_: setattr(self, "active", True))
        module.register_forward_hook(lambda *_: setattr(self, "active", False), always_call=True)


def _plain_saving() -> contextlib.AbstractContextManager:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def _kept(pack: Callable[[Tensor], Any] | None, storage: BlockStorage | None) -> Callable[[Tensor], Any]:
    """How a block keeps a tensor for its recompute: packed (int8) or not, then moved to host memory or not."""
    pack = pack or (lambda t: t)
    return pack if storage is None else (lambda t: storage.store(pack(t)))


def _kept_input_scope(quantizer: BlockQuantizer | None,
                      storage: BlockStorage | None) -> contextlib.AbstractContextManager:
    """Around a checkpoint call: the hooks that store the inputs it keeps (int8 and/or on the host)."""
    if quantizer is not None and "norm" in quantizer.cfg.kinds:
        return quantizer.kept_input_scope()  # its payloads go to the block's storage (parallel.quantize)
    return storage.hooks() if storage is not None else contextlib.nullcontext()


def _checkpointed(block: nn.Module, context_fn: Callable | None, quantizer: BlockQuantizer | None,
                  storage: BlockStorage | None) -> Callable[..., Tensor]:
    forward = block.forward

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        options = {"context_fn": context_fn} if context_fn is not None else {}
        # The checkpoint saves its tensor inputs under the hooks active around it, before its own.
        with _kept_input_scope(quantizer, storage):
            return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)

    return run


def _selective_context_fn(block: BlockPlan, quantizer: BlockQuantizer | None,
                          storage: BlockStorage | None) -> Callable:
    keep = _kept(quantizer and quantizer.pack_recompute_input, storage)
    attention = _ReplayedAttention(block.attention.attn_fn, _kept(quantizer and quantizer.pack_replayed_output,
                                                                  storage),
                                   storage.hooks if storage is not None else _plain_saving)
    block.attention.attn_fn = attention
    if not block.projections_read_in_backward:
        block.attention.register_forward_pre_hook(lambda *_: setattr(attention, "preparing_inputs", True))
    final_projection = _ModuleFlag(block.final_projection)
    return lambda: _SelectiveCache(attention, final_projection, keep).contexts()


def apply_recompute(model: nn.Module, plan: ParallelPlan, cfg: RecomputeConfig,
                    quantizers: Mapping[int, BlockQuantizer] | None = None,
                    storages: Mapping[int, BlockStorage] | None = None) -> None:
    """Make the selected blocks of `plan` recompute in backward, in place. By block index: `quantizers` (from
    parallel.quantize.apply_activation_quantization) store the kept tensors in int8, `storages` (from
    parallel.offload.apply_offload) keep them in host memory; none: kept as they are, where they are."""
    if cfg.mode == "none":
        return
    mark_applied(model, "recomputation")
    quantizers, storages = quantizers or {}, storages or {}
    for index in cfg.selected(len(plan.blocks)):
        block, quantizer, storage = plan.blocks[index], quantizers.get(index), storages.get(index)
        context_fn = _selective_context_fn(block, quantizer, storage) if cfg.mode == "selective" else None
        block.block.forward = _checkpointed(block.block, context_fn, quantizer, storage)

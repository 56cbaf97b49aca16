"""Mesa-style 8-bit stored activations: the forward runs exactly; what autograd keeps for backward is int8.

Saved-tensor hooks are installed around parts of each block, one per policy kind:

- "attention": tensors saved by the block's attn_fn (q, the K/V block, out; never the lse), one range per head;
- "linear": the inputs of the attention and feed-forward modules (the normalised activations every projection
  saves) and the attention output that the output projection saves;
- "elementwise": what the feed-forward's own code saves (SiLU input, product inputs, down-projection input);
  nothing for a feed-forward tiled along the sequence (lsys.tiling), which saves only its input (kind
  "linear") and recomputes the rest in backward from the dequantized input;
- "norm": what RMSNorm saves (its input and normalised output).

Each saved tensor site (block, scope, order of saving) keeps a running per-group range: the first step takes the
batch's min and max, later steps move it with `decay` (Mesa's running estimates), and values outside it clamp.
Codes use stochastic rounding seeded per step and site, so stored activations are unbiased. A storage saved
twice in one block (the normalised input saved by wq, wk and wv; out saved by attention and by wo) is quantized
once and shared. Per-row statistics, the lse, weights and RoPE tables stay as they are.

Blocks under selective recomputation (parallel.recompute) keep attention's tensors through autograd (kind
"attention") and the matmul outputs the recompute reads in the checkpoint's own cache, stored int8 under kind
"elementwise" (they are the inputs of the recomputed elementwise code); hooks inside a checkpointed region would
take tensors from the checkpoint, so no others are installed there. A block under recomputation, selective or
full, keeps its input for the recompute; that is stored int8 too (kind "norm": it is RMSNorm's input), so the
recompute starts from the dequantized input.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kernels.quant import dequantize_int8, group_range, quantize_int8, scale_shift_from_range
from parallel._compat import AsyncCollectiveTensor, FakeTensor
from parallel.config import QuantConfig, RecomputeConfig
from parallel.offload import BlockStorage
from parallel.plan import BlockPlan, ParallelPlan
from parallel.transforms import mark_applied

SCOPES = ("attention", "attn", "ffn", "norm", "recompute", "block_input")
# Tensors with fewer elements per row than this stay unquantized: row statistics cost more to range than to keep.
MIN_CHANNELS = 8


@dataclass
class _Packed:
    """One int8 copy of a storage region, shared by every save of it."""

    codes: Tensor  # int8, the saved tensor's contiguous layout
    scale: Tensor
    shift: Tensor
    channel_dim: int
    dtype: torch.dtype


@dataclass
class _SavedView:
    packed: _Packed
    shape: torch.Size

    def unpack(self) -> Tensor:
        p = self.packed
        values = dequantize_int8(p.codes, p.scale, p.shift, channel_dim=p.channel_dim, dtype=p.dtype)
        return values.view(self.shape)


@dataclass
class _SavedDTensor:
    """A DTensor saved by a tensor-parallel module (parallel.tensor_parallel): its local shard is stored like
    any tensor, and the DTensor is rebuilt around it on unpack."""

    local: Any
    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]

    def unpack(self) -> Tensor:
        local = self.local.unpack() if isinstance(self.local, _SavedView) else self.local
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride)


def _local(t: Tensor) -> Tensor:
    """The plain tensor holding t's values here: a DTensor's shard; a collective's result once it arrived
    (DTensor's redistributions return wrappers that wait lazily and have no storage of their own)."""
    if isinstance(t, DTensor):
        with torch.no_grad():  # the shard itself (a view for a Parameter), with no autograd step in between
            t = t.to_local()
    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


class _Site:
    """Running range of one saved-tensor site."""

    def __init__(self, decay: float):
        self.decay = decay
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def update(self, x: Tensor, groups: int, channel_dim: int) -> tuple[Tensor, Tensor]:
        lo, hi = group_range(x, groups, channel_dim)
        if self.lo is None or self.lo.shape != lo.shape:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.decay * self.lo + (1 - self.decay) * lo
            self.hi = self.decay * self.hi + (1 - self.decay) * hi
        return scale_shift_from_range(self.lo, self.hi)


class BlockQuantizer:
    """The quantization state of one block: sites, the step counter for seeds, the per-forward share cache."""

    def __init__(self, cfg: QuantConfig, block_index: int, storage: BlockStorage | None = None):
        self.cfg = cfg
        self.block_index = block_index
        self.storage = storage  # where the block's payloads go until backward (host memory), or None: kept here
        self.sites: dict[tuple[str, int], _Site] = {}
        self.calls = 0
        self._shared: dict[tuple, tuple[weakref.ref, _Packed]] = {}
        self._order: dict[str, int] = {}

    def begin_forward(self) -> None:
        self.calls += 1
        self._shared.clear()
        self._order.clear()

    def end_forward(self) -> None:
        """The share cache serves one forward; past it, it would only keep payloads alive that backward no longer
        holds (or holds on the host)."""
        self._shared.clear()

    @staticmethod
    def _region(t: Tensor) -> tuple:
        # The storage object, not its data pointer: fake tensors (memory planning) have no data pointers, and a
        # storage's Python object is unique while the storage lives.
        t = _local(t)
        return id(t.untyped_storage()), t.storage_offset(), t.numel(), t.dtype

    def is_shared(self, t: Tensor) -> bool:
        """Whether this storage region was already quantized in this block's forward."""
        hit = self._shared.get(self._region(t))
        return hit is not None and hit[0]() is not None

    def _layout(self, t: Tensor, scope: str) -> tuple[int, int] | None:
        """(channel_dim, groups) for a tensor of this scope, or None to leave it unquantized."""
        if scope == "attention":
            if t.dim() < 4 or t.shape[-1] < MIN_CHANNELS:
                return None
            return t.dim() - 2, t.shape[-2]  # [..., H, D]: one range per head
        channels = t.shape[-1]
        if channels < MIN_CHANNELS:
            return None
        size = self.cfg.group_size if channels % self.cfg.group_size == 0 else channels
        return t.dim() - 1, channels // size

    # Outside autograd: quantizing builds no graph, and inside a checkpointed region the checkpoint's hooks
    # would count anything saved here.
    @torch.no_grad()
    def pack(self, t: Tensor, scope: str, wanted: Callable[[Tensor], bool]) -> Any:
        if not (t.is_floating_point() and t.dim() >= 2 and t.numel() and wanted(t)) or _is_weight(t):
            return t
        local = _local(t)
        packed = self._pack_local(local, scope)
        if packed is local:
            return t
        if isinstance(t, DTensor):
            return _SavedDTensor(packed, t.device_mesh, t.placements, t.shape, t.stride())
        return packed

    def _pack_local(self, t: Tensor, scope: str) -> Any:
        if self.is_shared(t) and t.is_contiguous():
            return _SavedView(self._shared[self._region(t)][1], t.shape)
        layout = self._layout(t, scope)
        if layout is None:
            return t
        channel_dim, groups = layout
        order = self._order.get(scope, 0)
        self._order[scope] = order + 1
        site = self.sites.setdefault((scope, order), _Site(self.cfg.decay))
        scale, shift = site.update(t, groups, channel_dim)
        # Integers only: hash() of a str is salted per process, which would differ between runs and ranks.
        seed = hash((self.cfg.seed, self.block_index, SCOPES.index(scope), order, self.calls)) & 0x7FFFFFFF
        # CPU: the vectorised path with generator noise; the hash-based torch twin exists to check Triton.
        backend = "auto" if t.is_cuda else "torch-rand"
        # Fake tensors (the memory planner) have no values to round: only the allocations matter (worked_slabs).
        codes = quantize_int8(t, scale, shift, channel_dim=channel_dim, seed=seed, stochastic=self.cfg.stochastic,
                              backend=backend, shapes_only=isinstance(t, FakeTensor))
        packed = _Packed(codes, scale, shift, channel_dim, t.dtype)
        if t.is_contiguous():
            # Held weakly through the viewed tensor: a projection saves a temporary 2-D view of its input.
            self._shared[self._region(t)] = (weakref.ref(t if t._base is None else t._base), packed)
        return _SavedView(packed, t.shape)

    def pack_recompute_input(self, t: Tensor) -> Any:
        """A matmul output kept by selective recomputation: int8 when kind "elementwise" is on."""
        if "elementwise" not in self.cfg.kinds:
            return t
        return self.pack(t, "recompute", lambda _: True)

    def pack_replayed_output(self, t: Tensor) -> Any:
        """Attention's output kept for selective recomputation's replay: the int8 copy attention saved of it,
        or (Ulysses: attention saved its head shard) a copy of its own."""
        if "attention" not in self.cfg.kinds:
            return t
        return self.pack(t, "attention", lambda _: True)

    @contextlib.contextmanager
    def kept_input_scope(self) -> Iterator[None]:
        """Around a checkpoint call: the block input it keeps for the recompute is stored int8 (kind "norm").
        A block under full recomputation runs no other hooks, so this is its forward for the step's seeds."""
        if "norm" not in self.cfg.kinds:
            yield
            return
        self.begin_forward()
        try:
            with self.scope("block_input", _activation):
                yield
        finally:
            self.end_forward()

    @contextlib.contextmanager
    def scope(self, name: str, wanted: Callable[[Tensor], bool] = lambda t: True) -> Iterator[None]:
        def pack(t: Tensor) -> Any:
            packed = self.pack(t, name, wanted)
            if self.storage is None or _is_weight(t):
                return packed
            return self.storage.store(packed)

        def unpack(saved: Any) -> Tensor:
            return saved.unpack() if hasattr(saved, "unpack") else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield


def _single_input_chain(t: Tensor, length: int = 4) -> Iterator:
    """t's autograd node and its ancestors while each has exactly one input: the views and casts leading to t."""
    node = t.grad_fn
    for _ in range(length):
        if node is None:
            return
        yield node
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        if len(inputs) != 1:
            return
        node = inputs[0]


# Autograd nodes of views and casts: what lies between a parameter and what a projection saves of it.
_VIEW_OR_CAST = {"ToCopyBackward", "TBackward", "ViewBackward", "UnsafeViewBackward", "PermuteBackward",
                 "TransposeBackward", "ExpandBackward", "AliasBackward", "AsStridedBackward", "ReshapeAliasBackward"}


def _is_weight(t: Tensor) -> bool:
    """A parameter, or a view or autocast copy of one (what a projection saves to compute its input's
    gradient): view and cast steps that end at a parameter's gradient accumulator. An embedding's output
    also has a single parameter input, but is an activation."""
    if isinstance(t, nn.Parameter):
        return True
    for node in _single_input_chain(t):
        name = type(node).__name__
        if name == "AccumulateGrad":
            return True
        if name.rstrip("0123456789") not in _VIEW_OR_CAST:
            return False
    return False


def _activation(t: Tensor) -> bool:
    # Outside autograd Functions every activation requires grad; constants (RoPE tables) do not.
    return t.requires_grad


class _QuantizedAttention:
    """attn_fn whose saved tensors are int8 (kind "attention")."""

    def __init__(self, attn_fn: Callable[..., Tensor], quantizer: BlockQuantizer):
        self.attn_fn = attn_fn
        self.quantizer = quantizer

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.quantizer.scope("attention"):
            return self.attn_fn(*args, **kwargs)


def _is_input_or_its_copy(reference: Tensor) -> Callable[[Tensor], bool]:
    """Whether a saved tensor is `reference` itself (or a view of its storage), or what a projection saves
    of it under autocast: a cast copy, possibly viewed, i.e. single-input autograd steps back to it."""
    # The storage object (fake tensors have no data pointer), held weakly so the check keeps no memory alive.
    storage, source = weakref.ref(_local(reference).untyped_storage()), reference.grad_fn

    def check(t: Tensor) -> bool:
        if _local(t).untyped_storage() is storage():
            return True
        return source is not None and any(node is source for node in _single_input_chain(t))

    return check


def _wrap_forward(module: nn.Module, run: Callable[[Callable, tuple, dict], Tensor]) -> None:
    inner = module.forward
    module.forward = lambda *args, **kwargs: run(inner, args, kwargs)


def apply_activation_quantization(
    model: nn.Module, plan: ParallelPlan, cfg: QuantConfig, recompute: RecomputeConfig,
    storages: Mapping[int, BlockStorage] | None = None,
) -> dict[int, BlockQuantizer]:
    """Store the selected kinds of saved activations of every block of `plan` in int8, in place.

    Returns each block's quantizer by block index (none when int8 is off): recomputation (parallel.recompute)
    stores what its checkpoints keep with them. `recompute` says which blocks it will checkpoint, and how;
    `storages` (parallel.offload, by block index) where a recomputed block's payloads are kept until backward."""
    if cfg.activations == "none":
        return {}
    mark_applied(model, "activation quantization")
    kinds = set(cfg.kinds)
    recomputed = set(recompute.selected(len(plan.blocks)))
    storages = storages or {}
    quantizers = {index: BlockQuantizer(cfg, index, storages.get(index)) for index in range(len(plan.blocks))}
    for index, block in enumerate(plan.blocks):
        quantizer = quantizers[index]
        if index in recomputed and recompute.mode == "full":
            continue  # keeps only its input, which the checkpoint holds (see kept_input_scope)

        def block_forward(inner, args, kwargs, quantizer=quantizer):
            quantizer.begin_forward()
            try:
                return inner(*args, **kwargs)
            finally:
                quantizer.end_forward()

        _wrap_forward(block.block, block_forward)
        if "attention" in kinds:
            block.attention.attn_fn = _QuantizedAttention(block.attention.attn_fn, quantizer)
        if index not in recomputed:
            _quantize_sublayers(block, kinds, quantizer)
    return quantizers


def _quantize_sublayers(block: BlockPlan, kinds: set[str], quantizer: BlockQuantizer) -> None:
    """Hooks around the attention and feed-forward modules and the norms of a block that is not recomputed."""
    for name, module in (("attn", block.attention), ("ffn", block.feed_forward)):
        elementwise = module is block.feed_forward and "elementwise" in kinds
        if "linear" not in kinds and not elementwise:
            continue

        def scoped(inner, args, kwargs, module=module, name=name, elementwise=elementwise):
            is_input = _is_input_or_its_copy(args[0])
            if elementwise and "linear" in kinds:
                wanted = _activation
            elif elementwise:
                wanted = lambda t: _activation(t) and not is_input(t)  # noqa: E731
            elif module is block.attention:
                # Its input (saved by the q, k, v projections) and attention's out where attn_fn quantized it
                # (saved again by the output projection); not the RoPE tables.
                wanted = lambda t: is_input(t) or quantizer.is_shared(t)  # noqa: E731
            else:
                wanted = is_input
            with quantizer.scope(name, wanted):
                return inner(*args, **kwargs)

        _wrap_forward(module, scoped)
    if "norm" in kinds:
        for norm in block.norms:
            def normed(inner, args, kwargs):
                with quantizer.scope("norm", _activation):
                    return inner(*args, **kwargs)

            _wrap_forward(norm, normed)

"""Configuration owned by the parallelism layer. Plain dataclasses: lsys embeds them in its OmegaConf schema."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CP_LAYOUTS = ("zigzag", "contiguous", "balanced")
# "balanced": each ring rank holds this many equal chunks of the sequence, chosen per batch by their attention cost
# under the batch's document masks (parallel.context.balance). More chunks balance finer and cost more block calls.
BALANCED_CHUNKS_PER_RANK = 8
# The shortest sequence a run trains on (data.seq_len, data.curriculum.start_len). Lengths the trainer's curriculum
# and the budget search choose are multiples of it (sequence_granularity), so each one is itself a valid length.
MIN_SEQ_LEN = 8
RECOMPUTE_MODES = ("none", "selective", "full")
OFFLOAD_MODES = ("none", "cpu")
QUANT_MODES = ("none", "int8")
QUANT_KINDS = ("attention", "linear", "elementwise", "norm")


@dataclass
class ParallelConfig:
    """Parallel degrees; their product must equal the world size.

    dp: data-parallel degree, -1 to take whatever the other degrees leave of the world size.
    cp_ring / cp_ulysses: context-parallel degrees (ring attention, Ulysses all-to-all; both: 2-D hybrid).
    tp: tensor-parallel degree.
    cp_layout: how the sequence is split over ring ranks: "zigzag" balances plain causal work, "contiguous" does
      not, "balanced" balances document-masked causal work batch by batch (needs document masks).
    fsdp_unit_params: the fewest parameters one FSDP2 unit gathers: consecutive blocks are grouped until they hold
      this many, and blocks left below it stay with the root (gathered for the whole step). 0: every block is its
      own unit. Each unit costs an all-gather in forward and in backward and a reduce-scatter, whatever its size,
      so a small model on CPU ranks trains faster with fewer units; a large one needs per-block units for memory.
    fsdp_offload: "cpu" keeps parameter and gradient shards in host memory, where the optimizer steps (FSDP2's
      CPUOffloadPolicy; applied on one rank too): a device then holds only the units it is computing with.
    """

    dp: int = -1
    cp_ring: int = 1
    cp_ulysses: int = 1
    tp: int = 1
    cp_layout: str = "zigzag"
    fsdp_unit_params: int = 0
    fsdp_offload: str = "none"

    @property
    def cp(self) -> int:
        return self.cp_ring * self.cp_ulysses

    @property
    def seq_multiple(self) -> int:
        """Sequence lengths must be multiples of this (`sequence_multiple` of these degrees and layout)."""
        return sequence_multiple(self.cp_ring, self.cp_ulysses, self.tp, self.cp_layout)

    @property
    def seq_granularity(self) -> int:
        """Lengths chosen for training (curriculum, budget search) are multiples of this (`sequence_granularity`)."""
        return sequence_granularity(self.cp_ring, self.cp_ulysses, self.tp, self.cp_layout)

    def resolved_dp(self, world_size: int) -> int:
        """The data-parallel degree for `world_size`, raising ValueError when the degrees cannot tile it."""
        model_ranks = self.cp * self.tp
        if self.dp == -1:
            if world_size % model_ranks:
                raise ValueError(
                    f"parallel: world size {world_size} is not divisible by cp_ring*cp_ulysses*tp={model_ranks}; "
                    "change the number of ranks or the degrees"
                )
            return world_size // model_ranks
        if self.dp * model_ranks != world_size:
            raise ValueError(
                f"parallel.dp={self.dp} x cp_ring={self.cp_ring} x cp_ulysses={self.cp_ulysses} x tp={self.tp} "
                f"= {self.dp * model_ranks} ranks, but the world size is {world_size}; set parallel.dp=-1 "
                "or make the product equal the number of ranks"
            )
        return self.dp

    def validate(self) -> None:
        for key in ("cp_ring", "cp_ulysses", "tp"):
            value = getattr(self, key)
            if value < 1:
                raise ValueError(f"parallel.{key}={value}: degrees are at least 1")
        if self.dp == 0 or self.dp < -1:
            raise ValueError(f"parallel.dp={self.dp}: use a positive degree, or -1 to fill the world size")
        if self.cp_layout not in CP_LAYOUTS:
            raise ValueError(f"parallel.cp_layout={self.cp_layout!r}: choose one of {', '.join(CP_LAYOUTS)}")
        if self.fsdp_offload not in OFFLOAD_MODES:
            raise ValueError(f"parallel.fsdp_offload={self.fsdp_offload!r}: choose one of "
                             f"{', '.join(OFFLOAD_MODES)}")
        if self.fsdp_unit_params < 0:
            raise ValueError(f"parallel.fsdp_unit_params={self.fsdp_unit_params}: use 0 for one FSDP2 unit per "
                             "block, or the fewest parameters a unit of consecutive blocks holds")


def sequence_multiple(cp_ring: int, cp_ulysses: int, tp: int = 1, layout: str = "zigzag") -> int:
    """What every sequence length must be a multiple of to be sharded over these degrees and `layout` (one of
    CP_LAYOUTS). The ring axis is cut into `ring_chunks` equal chunks and each ring rank's part is cut again into
    cp_ulysses parts, so the length must divide both ways; sequence parallelism then cuts every one of those parts
    into tp pieces."""
    return math.lcm(ring_chunks(cp_ring, layout), cp_ring * cp_ulysses) * tp


def ring_chunks(cp_ring: int, layout: str) -> int:
    """How many equal chunks `layout` cuts the sequence into over `cp_ring` ring ranks: zigzag 2 per rank,
    balanced BALANCED_CHUNKS_PER_RANK per rank, contiguous (and any layout over one ring rank) 1 per rank."""
    if cp_ring == 1 or layout == "contiguous":
        return cp_ring
    return cp_ring * (2 if layout == "zigzag" else BALANCED_CHUNKS_PER_RANK)


def sequence_granularity(cp_ring: int, cp_ulysses: int, tp: int = 1, layout: str = "zigzag") -> int:
    """Training lengths the run chooses itself are multiples of this: every positive multiple can be sharded
    (`sequence_multiple`) and is at least MIN_SEQ_LEN."""
    return math.lcm(MIN_SEQ_LEN, sequence_multiple(cp_ring, cp_ulysses, tp, layout))


def check_model_split(*, hidden_size: int, num_heads: int, num_kv_heads: int, ffn_hidden_size: int,
                      head_dim: int = 0, cp_ulysses: int = 1, tp: int = 1) -> None:
    """Raises ValueError naming the config key, the value and the fix when the model's widths cannot be split
    over these degrees (positive numbers): every head dimension must be even for RoPE, grouped-query attention
    shares each KV head among whole query heads, tensor parallelism gives each rank whole query and KV heads
    and a slice of the feed-forward width, and Ulysses gives each rank whole heads of the ones tp left it.
    `head_dim` 0: hidden_size / num_heads, which must then divide evenly."""
    if not head_dim and hidden_size % num_heads:
        raise ValueError(f"model.hidden_size={hidden_size}: must be divisible by model.num_heads={num_heads} "
                         "(hidden_size / num_heads is the head dimension); pick a multiple of the head count, or "
                         "set model.head_dim")
    if head_dim % 2:
        raise ValueError(f"model.head_dim={head_dim}: must be even for RoPE")
    head_dim = head_dim or hidden_size // num_heads
    if head_dim % 2:
        raise ValueError(f"model.hidden_size={hidden_size}: head dimension hidden_size/num_heads={head_dim} must be "
                         f"even for RoPE; pick a multiple of 2 x model.num_heads={2 * num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"model.num_kv_heads={num_kv_heads}: must divide model.num_heads={num_heads} "
                         "(grouped-query attention)")
    for key, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if value % tp:
            raise ValueError(f"parallel.tp={tp}: must divide model.{key}={value}, since tensor parallelism gives "
                             "each rank whole heads; pick a degree that divides both head counts")
    if ffn_hidden_size % tp:
        raise ValueError(f"parallel.tp={tp}: must divide the feed-forward width {ffn_hidden_size} "
                         "(model.ffn_hidden_size); pick a degree that divides it")
    if num_heads % (cp_ulysses * tp):
        raise ValueError(f"parallel.cp_ulysses={cp_ulysses}: times parallel.tp={tp} must divide "
                         f"model.num_heads={num_heads}: Ulysses gives each rank whole heads of the ones tensor "
                         "parallelism left it; pick degrees whose product divides the head count")


@dataclass
class RecomputeConfig:
    """Activation recomputation (parallel.recompute).

    mode: "none"; "selective" keeps matmul outputs and attention's saved tensors and recomputes the
      elementwise parts; "full" keeps only each block's input and reruns the whole block in backward.
    every: apply to every k-th block (block index % every == 0).
    first: only among the first n blocks; 0 means all blocks.
    offload: "cpu" moves what the recomputing blocks keep to host memory until backward (parallel.offload).
    """

    mode: str = "none"
    every: int = 1
    first: int = 0
    offload: str = "none"

    def selected(self, num_blocks: int) -> list[int]:
        """Indices of the blocks that recompute."""
        if self.mode == "none":
            return []
        limit = min(self.first, num_blocks) if self.first else num_blocks
        return list(range(0, limit, self.every))

    def validate(self) -> None:
        if self.mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute.mode={self.mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
        if self.every < 1:
            raise ValueError(f"recompute.every={self.every}: use 1 for every block, or k for every k-th")
        if self.first < 0:
            raise ValueError(f"recompute.first={self.first}: use 0 for all blocks, or n for the first n")
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"recompute.offload={self.offload!r}: choose one of {', '.join(OFFLOAD_MODES)}")
        if self.offload != "none" and self.mode == "none":
            raise ValueError(f"recompute.offload={self.offload}: it moves what recomputation keeps; set "
                             "recompute.mode=selective or full")


@dataclass
class QuantConfig:
    """8-bit stored activations (parallel.quantize): the forward is exact, the copies kept for backward are int8.

    activations: "none" or "int8".
    kinds: which saved tensors: "attention" (q, K/V, out; per head), "linear" (projection inputs), "elementwise"
      (the feed-forward's SiLU and product inputs), "norm" (RMSNorm's saved input and output).
    decay: weight of the running range estimate per step (Mesa); the first step uses the batch's range.
    group_size: channels per range group for [..., C] tensors (attention tensors get one range per head).
    stochastic: stochastic rounding (unbiased) instead of round-to-nearest.
    seed: seed of the rounding noise.
    """

    activations: str = "none"
    kinds: list[str] = field(default_factory=lambda: list(QUANT_KINDS))
    decay: float = 0.9
    group_size: int = 64
    stochastic: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.activations not in QUANT_MODES:
            raise ValueError(f"quant.activations={self.activations!r}: choose one of {', '.join(QUANT_MODES)}")
        unknown = [kind for kind in self.kinds if kind not in QUANT_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"quant.kinds={list(self.kinds)}: use a non-empty subset of {', '.join(QUANT_KINDS)}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"quant.decay={self.decay}: must lie in [0, 1) (0 uses each batch's own range)")
        if self.group_size < 1:
            raise ValueError(f"quant.group_size={self.group_size}: must be a positive number of channels")

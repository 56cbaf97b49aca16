"""Configuration owned by the parallelism layer. Plain dataclasses: lsys embeds them in its OmegaConf schema."""

from __future__ import annotations

from dataclasses import dataclass, field

CP_LAYOUTS = ("zigzag", "contiguous")
RECOMPUTE_MODES = ("none", "selective", "full")
QUANT_MODES = ("none", "int8")
QUANT_KINDS = ("attention", "linear", "elementwise", "norm")


@dataclass
class ParallelConfig:
    """Parallel degrees; their product must equal the world size.

    dp: data-parallel degree, -1 to take whatever the other degrees leave of the world size.
    cp_ring / cp_ulysses: context-parallel degrees (ring attention, Ulysses all-to-all; both: 2-D hybrid).
    tp: tensor-parallel degree.
    cp_layout: how the sequence is split over ring ranks: "zigzag" balances causal work, "contiguous" does not.
    fsdp_unit_params: the fewest parameters one FSDP2 unit gathers: consecutive blocks are grouped until they hold
      this many, and blocks left below it stay with the root (gathered for the whole step). 0: every block is its
      own unit. Each unit costs an all-gather in forward and in backward and a reduce-scatter, whatever its size,
      so a small model on CPU ranks trains faster with fewer units; a large one needs per-block units for memory.
    """

    dp: int = -1
    cp_ring: int = 1
    cp_ulysses: int = 1
    tp: int = 1
    cp_layout: str = "zigzag"
    fsdp_unit_params: int = 0

    @property
    def cp(self) -> int:
        return self.cp_ring * self.cp_ulysses

    @property
    def seq_chunks(self) -> int:
        """Sequence lengths must be multiples of this: zigzag cuts the ring axis into 2 x cp_ring chunks, each
        ring shard is cut again over the Ulysses ranks, and sequence parallelism cuts a rank's part over tp."""
        return self.cp * self.tp * (2 if self.cp_layout == "zigzag" and self.cp_ring > 1 else 1)

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

    def check_tensor_parallel(self, num_heads: int, num_kv_heads: int, ffn_hidden: int) -> None:
        """Raises ValueError when the model cannot be split over `tp` ranks (each rank gets whole heads)."""
        for key, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if value % self.tp:
                raise ValueError(f"parallel.tp={self.tp}: must divide model.{key}={value}, since tensor parallelism "
                                 "gives each rank whole heads; pick a degree that divides both head counts")
        if ffn_hidden % self.tp:
            raise ValueError(f"parallel.tp={self.tp}: must divide the feed-forward width {ffn_hidden} "
                             "(model.ffn_hidden_size); pick a degree that divides it")

    def validate(self) -> None:
        for key in ("cp_ring", "cp_ulysses", "tp"):
            value = getattr(self, key)
            if value < 1:
                raise ValueError(f"parallel.{key}={value}: degrees are at least 1")
        if self.dp == 0 or self.dp < -1:
            raise ValueError(f"parallel.dp={self.dp}: use a positive degree, or -1 to fill the world size")
        if self.cp_layout not in CP_LAYOUTS:
            raise ValueError(f"parallel.cp_layout={self.cp_layout!r}: choose one of {', '.join(CP_LAYOUTS)}")
        if self.fsdp_unit_params < 0:
            raise ValueError(f"parallel.fsdp_unit_params={self.fsdp_unit_params}: use 0 for one FSDP2 unit per "
                             "block, or the fewest parameters a unit of consecutive blocks holds")


@dataclass
class RecomputeConfig:
    """Activation recomputation (parallel.recompute).

    mode: "none"; "selective" keeps matmul outputs and attention's saved tensors and recomputes the
      elementwise parts; "full" keeps only each block's input and reruns the whole block in backward.
    every: apply to every k-th block (block index % every == 0).
    first: only among the first n blocks; 0 means all blocks.
    """

    mode: str = "none"
    every: int = 1
    first: int = 0

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

"""Context parallelism: shard a sequence over ranks and attend across the shards (ring, Ulysses, hybrid).

The sharding rule is in parallel.context.layout; `shard`, `gather` and `attention` must be called with the
same groups and layout. A layout balanced for a batch's documents comes from `balance_layout`.
"""

from parallel.context.api import attention, check_attention_inputs
from parallel.context.balance import ShardedDocuments, balance_layout, sharded_attention
from parallel.context.layout import (
    CP_LAYOUTS,
    ChunkLayout,
    check_groups,
    check_layout,
    check_sequence,
    chunk_layout,
    gather,
    group_shard_indices,
    shard,
    shard_indices,
)
from parallel.context.ring import ring_attention
from parallel.context.ulysses import check_ulysses_heads, heads_to_seq, seq_to_heads, ulysses_kv_heads

__all__ = [
    "CP_LAYOUTS",
    "ChunkLayout",
    "ShardedDocuments",
    "attention",
    "balance_layout",
    "check_attention_inputs",
    "check_groups",
    "check_layout",
    "check_sequence",
    "check_ulysses_heads",
    "chunk_layout",
    "gather",
    "group_shard_indices",
    "heads_to_seq",
    "ring_attention",
    "seq_to_heads",
    "shard",
    "shard_indices",
    "sharded_attention",
    "ulysses_kv_heads",
]

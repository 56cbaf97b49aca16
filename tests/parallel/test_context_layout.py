"""Sequence layout of context parallelism: chunk ownership, shard/gather round trips, and configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.config import MIN_SEQ_LEN, sequence_granularity, sequence_multiple
from parallel.context import (
    ChunkLayout,
    attention,
    check_attention_inputs,
    check_sequence,
    check_ulysses_heads,
    gather,
    group_shard_indices,
    shard,
    shard_indices,
    ulysses_kv_heads,
)
from tests.distributed import run_ranks


def test_zigzag_rank_holds_chunk_r_and_its_mirror():
    # 16 positions, ring of 4: 8 chunks of 2; rank r holds chunks r and 7 - r.
    owned = [shard_indices(16, ring_size=4, ring_rank=r).tolist() for r in range(4)]
    assert owned == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]


def test_zigzag_balances_causal_work():
    # Keys visible to a query at position p: p + 1. Every ring rank gets the same total.
    work = [int((shard_indices(64, ring_size=4, ring_rank=r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1


def test_contiguous_and_ulysses_only_are_plain_slices():
    assert shard_indices(8, ring_size=2, ring_rank=1, layout="contiguous").tolist() == [4, 5, 6, 7]
    # Zigzag over a single ring rank is the identity, so Ulysses alone splits contiguously.
    assert shard_indices(8, ulysses_size=4, ulysses_rank=2).tolist() == [4, 5]


def test_hybrid_splits_each_ring_shard_contiguously_over_ulysses():
    # Ring of 2 (4 chunks of 4), Ulysses of 2: ring rank 1 holds chunks 1 and 2 = positions 4..11.
    parts = [shard_indices(16, ring_size=2, ring_rank=1, ulysses_size=2, ulysses_rank=u).tolist() for u in (0, 1)]
    assert parts == [[4, 5, 6, 7], [8, 9, 10, 11]]
    # Ulysses parts may straddle the two zigzag chunks; their concatenation is still the ring shard.
    parts = [shard_indices(24, ring_size=2, ring_rank=0, ulysses_size=4, ulysses_rank=u).tolist() for u in range(4)]
    assert sum(parts, []) == [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize(("ring", "ulysses"), [(1, 1), (2, 1), (4, 1), (1, 4), (2, 2), (4, 2)])
def test_every_position_is_held_exactly_once(layout, ring, ulysses):
    owned = torch.cat(
        [
            shard_indices(48, ring_size=ring, ring_rank=r, ulysses_size=ulysses, ulysses_rank=u, layout=layout)
            for r in range(ring)
            for u in range(ulysses)
        ]
    )
    assert sorted(owned.tolist()) == list(range(48))


def test_shard_without_groups_is_the_identity():
    x = torch.arange(12).view(2, 6)
    assert torch.equal(shard(x), x) and torch.equal(gather(x), x)


def test_indivisible_sequence_names_the_fix():
    with pytest.raises(ValueError, match="multiple of 8"):
        check_sequence(12, 4, 1, "zigzag")
    with pytest.raises(ValueError, match="multiple of 4"):
        check_sequence(6, 4, 1, "contiguous")
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_indices(20, ring_size=2, ulysses_size=4)
    check_sequence(12, 1, 4, "zigzag")


def accepted_lengths(ring: int, ulysses: int, layout, up_to: int) -> list[int]:
    """The sequence lengths 1..up_to that `check_sequence` accepts for these sizes and layout."""
    accepted = []
    for seq_len in range(1, up_to + 1):
        try:
            check_sequence(seq_len, ring, ulysses, layout)
            accepted.append(seq_len)
        except ValueError:
            pass
    return accepted


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_the_config_rule_is_the_smallest_length_the_layout_shards(layout):
    for ring in range(1, 5):
        for ulysses in range(1, 5):
            multiple = sequence_multiple(ring, ulysses, layout=layout)
            assert accepted_lengths(ring, ulysses, layout, 3 * multiple) == [multiple, 2 * multiple, 3 * multiple]
            # Sequence parallelism cuts every part again; training lengths are also at least MIN_SEQ_LEN.
            assert sequence_multiple(ring, ulysses, 3, layout) == 3 * multiple
            granularity = sequence_granularity(ring, ulysses, 1, layout)
            assert granularity % multiple == 0 and granularity % MIN_SEQ_LEN == 0


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="layout='striped'"):
        shard(torch.zeros(2, 8), layout="striped")
    with pytest.raises(ValueError, match="layout='striped'"):
        shard_indices(8, layout="striped")


def test_heads_not_divisible_by_ulysses_size():
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by the Ulysses size 4"):
        check_ulysses_heads(6, 2, 4)
    q = torch.zeros(1, 4, 6, 8)
    kv = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="Ulysses size 4"):
        check_attention_inputs(q, kv, kv, ring_size=1, ulysses_size=4, layout="zigzag")


def test_kv_heads_are_replicated_to_a_count_the_ulysses_size_divides():
    assert ulysses_kv_heads(8, 8, 4) == 8
    assert ulysses_kv_heads(8, 1, 4) == 4
    assert ulysses_kv_heads(8, 2, 4) == 4
    assert ulysses_kv_heads(12, 3, 2) == 6
    with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
        ulysses_kv_heads(8, 3, 2)


def test_mismatched_shapes_are_rejected():
    q = torch.zeros(1, 4, 4, 8)
    with pytest.raises(ValueError, match="must agree"):
        check_attention_inputs(q, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), ring_size=1, ulysses_size=1,
                               layout="zigzag")
    with pytest.raises(ValueError, match="expects q"):
        check_attention_inputs(q, q, q[..., :4], ring_size=1, ulysses_size=1, layout="zigzag")


def _round_trips():
    rank, world = dist.get_rank(), dist.group.WORLD
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    configs = {
        "ring4": (world, None, 8),
        "ulysses4": (None, world, 8),
        "ring2": (pairs[rank // 2], None, 16),
        "hybrid": (strided[rank % 2], pairs[rank // 2], 8),
        "hybrid transposed": (pairs[rank // 2], strided[rank % 2], 8),
    }
    tokens = torch.arange(2 * 32).view(2, 32)
    features = torch.randn(32, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Chunks dealt out of order, as a balanced layout may (keyed by ring size).
    dealt = {1: ChunkLayout(((0,),)), 2: ChunkLayout(((1, 2, 5, 6), (0, 3, 4, 7))),
             4: ChunkLayout(((0, 5), (1, 4), (2, 7), (3, 6)))}
    owned = {}
    for name, (ring_group, ulysses_group, local_len) in configs.items():
        ring_size = 1 if ring_group is None else dist.get_world_size(ring_group)
        for layout in ("zigzag", "contiguous", dealt[ring_size]):
            groups = {"ring_group": ring_group, "ulysses_group": ulysses_group, "layout": layout}
            local_tokens = shard(tokens, 1, **groups)
            assert local_tokens.dtype == torch.int64 and local_tokens.shape == (2, local_len)
            assert torch.equal(local_tokens[0], group_shard_indices(32, **groups))
            assert torch.equal(gather(local_tokens, 1, **groups), tokens)
            # Any sequence dim, negative too; gather's backward hands back this rank's shard of the gradient.
            local = shard(features, 0, **groups).requires_grad_()
            full = gather(local, -3, **groups)
            assert torch.equal(full, features)
            (full * features).sum().backward()
            assert torch.equal(local.grad, shard(features, 0, **groups))
            owned[f"{name} {'dealt' if isinstance(layout, ChunkLayout) else layout}"] = local_tokens[0].tolist()
    # Overlapping groups cannot be two axes of one mesh.
    with pytest.raises(ValueError, match="share ranks"):
        shard(tokens, 1, ring_group=world, ulysses_group=pairs[rank // 2])
    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by the Ulysses size 4"):
        attention(q, q, q, ulysses_group=world)
    with pytest.raises(ValueError, match="multiple of 8"):
        attention(torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8), ring_group=world)
    return owned


def test_shard_gather_round_trip_on_four_ranks():
    owned = run_ranks(_round_trips, 4)
    for key in owned[0]:
        positions = sorted(sum((rank_owned[key] for rank_owned in owned), []))
        # Each position once per independent copy of the sequence (two copies with groups of two ranks).
        copies = 2 if "ring2" in key else 1
        assert positions == sorted(list(range(32)) * copies), key
    assert owned[1]["ring4 zigzag"] == [4, 5, 6, 7, 24, 25, 26, 27]
    # Ring rank 1 of 2 holds chunks 1 and 2 of 4 (positions 8..23); Ulysses rank 1 its second half.
    assert owned[3]["hybrid zigzag"] == [16, 17, 18, 19, 20, 21, 22, 23]
    assert owned[1]["ring4 dealt"] == [4, 5, 6, 7, 16, 17, 18, 19]

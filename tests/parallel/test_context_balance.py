"""Chunk layouts: the ring's block plan for any of them, and the layout balanced for a batch's documents.

The distributed exactness of attention under balanced layouts is in test_context_attention (document cases)."""

from __future__ import annotations

import itertools

import pytest
import torch

from parallel.config import BALANCED_CHUNKS_PER_RANK, sequence_multiple
from parallel.context import ChunkLayout, balance_layout, chunk_layout, shard_indices
from parallel.context.balance import assign_chunks, position_work
from parallel.context.ring import block_plan
from tests.parallel.test_context_layout import accepted_lengths


def _pairs_computed(layout: ChunkLayout, seq_len: int, causal: bool) -> torch.Tensor:
    """[S, S] bool: the (query, key) pairs of original positions the ring's block calls cover, each at most once."""
    ring = layout.ring_size
    held = [shard_indices(seq_len, ring_size=ring, ring_rank=r, layout=layout) for r in range(ring)]
    local = seq_len // ring
    covered = torch.zeros(seq_len, seq_len, dtype=torch.int64)
    for rank, source in itertools.product(range(ring), repeat=2):
        for rows, keys, block_causal in block_plan(source, rank, local, causal, layout):
            block = torch.ones(rows.stop - rows.start, keys.stop - keys.start, dtype=torch.int64)
            if block_causal:
                block = block.tril()
            q_pos, k_pos = held[rank][rows], held[source][keys]
            covered[q_pos[:, None], k_pos[None, :]] += block
    assert covered.max() <= 1, "a pair is computed twice"
    return covered.bool()


@pytest.mark.parametrize("causal", [True, False])
def test_block_plan_covers_exactly_the_causal_pairs_of_any_chunk_layout(causal):
    generator = torch.Generator().manual_seed(0)
    layouts = [chunk_layout("zigzag", 4), chunk_layout("contiguous", 3), chunk_layout("zigzag", 1)]
    for ring, per_rank in ((2, 4), (3, 3), (4, 2)):
        for _ in range(5):  # random assignments of chunks to ranks
            chunks = torch.randperm(ring * per_rank, generator=generator).view(ring, per_rank).sort(1).values
            layouts.append(ChunkLayout(tuple(tuple(row) for row in chunks.tolist())))
    for layout in layouts:
        seq_len = 2 * layout.num_chunks
        expected = torch.ones(seq_len, seq_len, dtype=torch.bool)
        if causal:
            expected = expected.tril()
        assert torch.equal(_pairs_computed(layout, seq_len, causal), expected), layout


def test_named_layouts_keep_their_schedules():
    zigzag = chunk_layout("zigzag", 4)
    assert zigzag.ranks == ((0, 7), (1, 6), (2, 5), (3, 4))
    everything, first, second = slice(0, 8), slice(0, 4), slice(4, 8)
    # From an earlier rank: all local queries, the first half of its K/V; from a later one the reverse.
    assert block_plan(0, 2, 8, True, zigzag) == [(everything, first, False)]
    assert block_plan(3, 2, 8, True, zigzag) == [(second, everything, False)]
    assert block_plan(2, 2, 8, True, zigzag) == [(everything, everything, True)]
    contiguous = chunk_layout("contiguous", 4)
    assert block_plan(3, 2, 8, True, contiguous) == [] and block_plan(1, 2, 8, True, contiguous) == [
        (everything, everything, False)
    ]


def test_chunk_layouts_must_partition_the_chunks_evenly_in_ascending_order():
    for bad in (((0, 1), (2,)), ((1, 0), (2, 3)), ((0, 1), (1, 2)), ((0, 2), (3, 4))):
        with pytest.raises(ValueError, match="as many chunks, in ascending order"):
            ChunkLayout(bad)
    with pytest.raises(ValueError, match="for 2 ring ranks but the ring group has 4"):
        chunk_layout(ChunkLayout(((0,), (1,))), 4)
    with pytest.raises(ValueError, match="chosen per batch"):
        shard_indices(16, ring_size=2, layout="balanced")


def test_position_work_counts_the_keys_each_query_attends():
    ids = torch.tensor([[4, 4, 4, 9, 9, 4, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]])
    same = ids[:, :, None] == ids[:, None, :]
    causal = same & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(position_work(ids), causal.sum(-1))
    assert torch.equal(position_work(ids, causal=False), same.sum(-1))


def _loads(work: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    ring = layout.ring_size
    return torch.stack([work[..., shard_indices(work.shape[-1], ring_size=ring, ring_rank=r, layout=layout)].sum()
                        for r in range(ring)]).double()


def test_balanced_layout_evens_out_document_work_where_zigzag_does_not():
    # One long document at the start and many short ones after it: zigzag's early chunks hold the long
    # document's cheap head, its late chunks cheap short documents, and its middle ranks the long tail.
    lengths = torch.tensor([1536] + [32] * 16)
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[None]
    work = position_work(ids)
    for ring in (2, 4):
        layout = balance_layout(ids, ring)
        assert layout.ring_size == ring and layout.num_chunks == ring * BALANCED_CHUNKS_PER_RANK
        zigzag, balanced = _loads(work, chunk_layout("zigzag", ring)), _loads(work, layout)
        assert zigzag.max() / zigzag.mean() > 1.3
        assert balanced.max() / balanced.mean() < 1.02, (ring, balanced)
        assert balance_layout(ids, ring) == layout  # every rank computes the same layout


def test_assign_chunks_gives_every_rank_as_many_and_never_worse_than_dealing_in_order():
    generator = torch.Generator().manual_seed(1)
    for ring, per_rank in ((2, 8), (4, 8), (8, 4)):
        costs = (torch.rand(ring * per_rank, generator=generator) ** 4 * 100).tolist()
        layout = assign_chunks(costs, ring)
        assert all(len(chunks) == per_rank for chunks in layout.ranks)
        loads = [sum(costs[c] for c in chunks) for chunks in layout.ranks]
        dealt = [sum(costs[r::ring]) for r in range(ring)]
        assert max(loads) <= max(dealt)
        assert max(loads) <= sum(costs) / ring + max(costs)  # within one chunk of perfect


def test_balanced_sequence_rule_is_the_smallest_length_its_layouts_shard():
    for ring, ulysses in ((1, 2), (2, 1), (2, 2), (4, 2), (3, 1)):
        multiple = sequence_multiple(ring, ulysses, layout="balanced")
        layout = balance_layout(torch.zeros(1, multiple, dtype=torch.int64), ring)
        assert accepted_lengths(ring, ulysses, layout, 3 * multiple) == [multiple, 2 * multiple, 3 * multiple]


def test_balance_layout_names_an_indivisible_length():
    with pytest.raises(ValueError, match=f"multiple of {2 * BALANCED_CHUNKS_PER_RANK}"):
        balance_layout(torch.zeros(1, 2 * BALANCED_CHUNKS_PER_RANK + 2, dtype=torch.int64), 2)

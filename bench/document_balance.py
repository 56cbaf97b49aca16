"""Per-rank attention work under document masks: how evenly zigzag, contiguous and balanced layouts share it.

With document masks a query attends only to the earlier keys of its own document, so the work of a query at
position p is p - start(document) + 1 pairs, and a rank's work is the sum over the positions its layout gives it
(parallel.context.layout.shard_indices; the ring computes exactly the pairs of its own queries). Plain causal
attention is the one-document case, which zigzag balances exactly. This counts pairs, it times nothing: the numbers
are the same on any machine.

Document lengths come from (a) a real corpus: every Python source file of the installed torch package as one
document, tokenized by `lsys prepare-data` (bytes), its lengths read back from the Megatron index; (b) synthetic
mixes: power-law (Pareto, alpha 1.2, 16 to 65,536 tokens) and uniform. Documents are packed in order into
sequences of `--seq-len` tokens, as the text task's dataset concatenates them; each sequence's imbalance is the
busiest rank's work over the mean, reported as the mean and the worst over the sequences. The balanced layout
(parallel.context.balance) is chosen for each sequence from its ids, as the trainer does for each batch, with
`--balanced-chunks` chunks per ring rank (the layout's default, parallel.config.BALANCED_CHUNKS_PER_RANK, first).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.commands import lsys  # noqa: E402
from bench.report import write_results  # noqa: E402
from parallel.config import BALANCED_CHUNKS_PER_RANK  # noqa: E402
from parallel.context.balance import assign_chunks  # noqa: E402
from parallel.context.layout import shard_indices  # noqa: E402

STATIC_LAYOUTS = ("zigzag", "contiguous")


def corpus_lengths(limit: int) -> np.ndarray:
    """Token counts of real documents: torch's own Python sources, prepared by `lsys prepare-data`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sources = sorted(Path(torch.__file__).parent.rglob("*.py"))[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with corpus.open("w") as f:
            for path in sources:
                text = path.read_text(errors="replace")
                if text.strip():
                    f.write(json.dumps({"text": text}) + "\n")
        lsys(Path(tmp) / "home", "prepare-data", str(corpus), str(Path(tmp) / "corpus"))
        dataset = IndexedDataset(str(Path(tmp) / "corpus"))
        lengths = np.array(dataset.sequence_lengths, dtype=np.int64)
        del dataset
    return lengths


def synthetic_lengths(kind: str, total: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "power-law":
        draws = 16 * (1 + rng.pareto(1.2, size=total // 16))
        lengths = np.minimum(draws, 65536).astype(np.int64)
    else:
        lengths = rng.integers(16, 4096, size=total // 16)
    return lengths[np.cumsum(lengths) <= total]


def packed_work(lengths: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Per-position work p - start + 1 of each full sequence the documents pack into, in original order. A
    document cut by a sequence boundary starts again at the boundary: attention never crosses sequences."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(starts.size)
    sequences = []
    for begin in range(0, starts.size - seq_len + 1, seq_len):
        part = slice(begin, begin + seq_len)
        sequences.append(positions[part] - np.maximum(starts[part], begin) + 1)
    return sequences


def imbalance(sequences: list[np.ndarray], ranks: int, layout: str | int) -> dict[str, float]:
    """Busiest rank's work / mean over `sequences` under a static layout, or (an int) a balanced one with that
    many chunks per rank chosen for each sequence (`balance_layout`'s dealing, on the same per-position work)."""
    seq_len = sequences[0].size
    ratios = []
    for work in sequences:
        if isinstance(layout, int):
            costs = work.reshape(ranks * layout, -1).sum(1).astype(np.float64).tolist()
            chunks = assign_chunks(costs, ranks)
        else:
            chunks = layout
        per_rank = np.array([work[shard_indices(seq_len, ring_size=ranks, ring_rank=r, layout=chunks).numpy()].sum()
                             for r in range(ranks)], dtype=np.float64)
        ratios.append(per_rank.max() / per_rank.mean())
    return {"mean": float(np.mean(ratios)), "worst": float(np.max(ratios))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--corpus-files", type=int, default=4000, help="how many torch sources to take")
    parser.add_argument("--balanced-chunks", type=int, nargs="+", default=[BALANCED_CHUNKS_PER_RANK],
                        help="chunks per ring rank of the balanced layouts to measure")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/document_balance.json")
    args = parser.parse_args()
    total = 64 * args.seq_len
    mixes = {"corpus (torch sources, bytes)": corpus_lengths(args.corpus_files),
             "power-law": synthetic_lengths("power-law", total, 0), "uniform 16-4096": synthetic_lengths("u", total, 0),
             "one document": np.array([total])}
    layouts = {**{name: name for name in STATIC_LAYOUTS},
               **{f"balanced/{n}" if n != BALANCED_CHUNKS_PER_RANK else "balanced": n for n in args.balanced_chunks}}
    results = {"seq_len": args.seq_len, "ranks": args.ranks, "balanced_chunks_per_rank": args.balanced_chunks,
               "mixes": {}}
    table = Table(title=f"busiest rank's attention pairs / mean, document masks, S={args.seq_len:,}: mean (worst) "
                        "over the packed sequences")
    table.add_column("documents", justify="left")
    table.add_column("docs, median len", justify="right")
    for ranks in args.ranks:
        for label in layouts:
            table.add_column(f"{label} P={ranks}", justify="right")
    for name, lengths in mixes.items():
        sequences = packed_work(lengths, args.seq_len)
        row = {"documents": int(lengths.size), "median_length": float(np.median(lengths)),
               "sequences": len(sequences), "imbalance": {}}
        cells = [name, f"{lengths.size:,}, {np.median(lengths):,.0f}"]
        for ranks in args.ranks:
            for label, layout in layouts.items():
                result = imbalance(sequences, ranks, layout)
                row["imbalance"][f"{label}/{ranks}"] = result
                cells.append(f"{result['mean']:.3f} ({result['worst']:.2f})")
        results["mixes"][name] = row
        table.add_row(*cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    write_results(results, args.output)


if __name__ == "__main__":
    main()

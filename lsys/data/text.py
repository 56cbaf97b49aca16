"""Language modelling on a tokenized corpus, read through megatron-core: `GPTDataset` splits built by
`BlendedMegatronDatasetBuilder` over one or several indexed datasets made by `prepare_text_dataset`.

Megatron and torch.distributed: the builder checks `torch.distributed.is_initialized()`. When a process group
exists (gloo or NCCL), rank 0 builds the document/sample/shuffle indices and writes them to `cache_dir`, every
rank meets at a barrier on the default group, then the other ranks load them. So with a process group every
rank must construct the task at the same point, and `cache_dir` must be one directory all ranks see (a shared
file system across nodes). Without a process group the process simply builds (or reuses) the cache itself.
Either way the indices depend only on the dataset, seed, seq_len, split and sample counts, so every rank and
every later run reads the same samples.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from lsys.data._megatron import import_megatron_datasets
from lsys.data.needle import TextNeedleTask
from lsys.data.needle import needle_tokens as fixed_needle_tokens
from lsys.data.task import SPLITS, Batch, Task, check_int, option_error, take_options
from lsys.data.tokenizer import ByteTokenizer, HFTokenizer
from lsys.data.verify import check_cache_dir, check_text_dataset, check_text_inputs, default_cache_dir

DEFAULTS = {
    "path": None,
    "weights": None,
    "split": "98,2,0",
    "cache_dir": None,
    "num_samples": None,
    "num_valid_samples": None,
}
# Metadata that must agree between blended datasets: they feed one embedding table.
_SHARED_METADATA = ("tokenizer", "vocab_size", "eod_id", "pad_id")


class _MegatronTokenizer:
    """The part of a Megatron tokenizer GPTDataset reads: special ids, the vocabulary size (which picks the
    token dtype) and `unique_identifiers`, which goes into the hash that names the cached indices.

    Megatron's own part of that hash names a dataset by its path only, so a dataset prepared again at the same
    path would reuse indices laid out for the old documents; the sha256 of every blended .bin (recorded in
    its metadata, not recomputed) gives new data new indices.
    """

    def __init__(self, metadata: list[dict[str, Any]]) -> None:
        self.vocab_size = metadata[0]["vocab_size"]
        self.eod = metadata[0]["eod_id"]
        self.pad = metadata[0]["pad_id"]
        self.unique_identifiers = {
            "class": "lsys",
            "tokenizer": metadata[0]["tokenizer"],
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
            "data_sha256": [m["files"]["bin"]["sha256"] for m in metadata],
        }


def _tokenizer(path: str | None, eod_id: int) -> ByteTokenizer | HFTokenizer:
    # None: the byte-level tokenizer (lsys prepare-data's default)
    return ByteTokenizer() if path is None else HFTokenizer(path, eod_id=eod_id)


class TextTask(Task):
    """Next-token prediction on real text; metric `bits_per_byte`.

    Options:
    - `path`: a dataset prefix made by `prepare_text_dataset`, or a list of them to blend (blending only under
      an initialised process group, see `_prefixes`).
    - `weights`: blend weights; None blends in proportion to size, given weights need both sample counts.
    - `split`: Megatron's "train,valid,test" shares, by document.
    - `cache_dir`: where Megatron caches its indices, a directory this user can write (or create); None or
      "" is `PREFIX_cache` beside the first dataset.
    - `num_samples` / `num_valid_samples`: samples Megatron lays out per split; None is one pass over the
      split's documents, more passes reshuffle, a weighted blend rounds each dataset's share up.
    Indices past a split's length wrap around, so any index is valid.

    A sample packs consecutive documents, each ended by EOD (which belongs to the document it ends): the task
    is `packed`, so by default attention stays within a document, positions restart with each and EOD's
    target (the next document's first token) is not trained; with data.document_masks=false every position
    is a target (including EOD), as in Megatron's pretraining. Bits per byte uses the corpus average bytes per
    target from the metadata: a batch of n targets stands for n * num_bytes / num_tokens bytes, or with
    document masks (one target fewer per document) n * num_bytes / (num_tokens - num_documents). Summed over
    the whole corpus this is exact; for the byte tokenizer each token is one byte except EOD, whose loss is
    charged to the bytes of its document, so a batch is exact up to where its EODs fall (with document masks,
    exactly: a document's targets are then as many as its bytes).
    """

    metric_name = "bits_per_byte"
    reads_dataset = True
    packed = True
    scores_every_position = True

    def __init__(self, seq_len: int, seed: int, **options: Any) -> None:
        super().__init__(seq_len, seed, options)
        opts = take_options("text", options, DEFAULTS)
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed}: the text task seeds numpy's RandomState, use 0 <= seed < 2**32")
        prefixes = _prefixes(opts["path"])
        # The cheap checks of `check_text_dataset`: megatron-core would assert or read garbage on a bad file.
        metadata = [check_text_dataset(p) for p in prefixes]
        for key in _SHARED_METADATA:
            if any(m[key] != metadata[0][key] for m in metadata):
                raise option_error("text", "path", prefixes, f"the datasets disagree on {key}; blend only "
                                   "datasets made with one tokenizer")
        weights = _weights(opts["weights"], prefixes, opts["num_samples"], opts["num_valid_samples"])
        sizes = [
            None if opts[key] is None else check_int("text", key, opts[key], 1)
            for key in ("num_samples", "num_valid_samples")
        ]
        _check_split(opts["split"])
        self.vocab_size = metadata[0]["vocab_size"]
        self.eod_id = metadata[0]["eod_id"]
        self._tokenizer_path = metadata[0]["tokenizer_path"]  # None: the byte-level tokenizer
        shares = np.array(weights or [m["num_tokens"] for m in metadata], dtype=float)
        # Bytes per target: every token is one, except with document masks the EOD of each document.
        self._bytes_per_target = {
            masked: float(sum(m["num_bytes"] / max(m["num_tokens"] - masked * m["num_documents"], 1) * share
                              for m, share in zip(metadata, shares, strict=True)) / shares.sum())
            for masked in (False, True)
        }
        cache_dir = opts["cache_dir"] or default_cache_dir(prefixes[0])
        check_cache_dir(cache_dir)
        self._datasets = _build_splits(prefixes, weights, sizes, opts["split"], cache_dir, seq_len, seed,
                                       _MegatronTokenizer(metadata))

    @classmethod
    def vocabulary(cls, seq_len: int, seed: int, options: Mapping[str, Any]) -> int:
        """From the datasets' metadata, after the checks of `check_text_inputs`: no megatron-core import and no
        index built, so a launcher can refuse a bad dataset before any rank starts."""
        opts = take_options("text", options, DEFAULTS)
        return check_text_inputs(opts["path"], opts["cache_dir"] or None)[0]["vocab_size"]

    def batch_of_length(self, indices: Sequence[int], length: int, split: str = "train") -> Batch:
        """The full-length samples truncated: exact for next-token prediction, and what DeepSpeed's length
        curriculum does."""
        full = self.batch(indices, split)
        return Batch(*(getattr(full, f.name)[:, :length] for f in fields(full)))

    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        """The tokenizer the dataset was prepared with (its metadata names it), ending documents as it did."""
        return _tokenizer(self._tokenizer_path, self.eod_id)

    @classmethod
    def needle_tokens(cls, options: Mapping[str, Any]) -> int:
        """From the first dataset's metadata and its tokenizer (no index built); see Task.needle_tokens."""
        opts = take_options("text", options, DEFAULTS)
        metadata = check_text_inputs(opts["path"], opts["cache_dir"] or None)[0]
        return fixed_needle_tokens(_tokenizer(metadata["tokenizer_path"], metadata["eod_id"]))

    def needle_task(self, length: int, depth: float) -> TextNeedleTask:
        """A needle sentence in this dataset's held-out text (lsys.data.needle), at any length."""
        return TextNeedleTask(self, length, depth)

    @property
    def bytes_per_token(self) -> float:
        return self._bytes_per_target[self.document_masks]

    def split_length(self, split: str) -> int:
        """Distinct samples in `split` before indices wrap around."""
        self.check_index(0, split)
        return len(self._datasets[split])

    def sample(self, index: int, split: str = "train") -> dict[str, torch.Tensor]:
        self.check_index(index, split)
        dataset = self._datasets[split]
        item = dataset[index % len(dataset)]
        tokens = item["tokens"]
        # Documents counted by the EODs before each token, then before the last label: [S + 1].
        ends = (tokens == self.eod_id).to(torch.int64)
        documents = torch.cat([ends.new_zeros(1), ends]).cumsum(0)
        return {"tokens": tokens, "labels": item["labels"], "loss_mask": item["loss_mask"].bool(),
                "documents": documents}


def _prefixes(path: Any) -> list[str]:
    paths = [path] if isinstance(path, str) else path
    if not paths or not isinstance(paths, Sequence) or not all(isinstance(p, str) and p for p in paths):
        raise option_error("text", "path", path, "set it to a dataset prefix (PREFIX.bin/.idx/.json) made by "
                           "prepare_text_dataset, or a list of them")
    if len(paths) > 1 and not torch.distributed.is_initialized():
        # megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() when its cache misses.
        raise option_error("text", "path", path, "blending several datasets needs an initialised process "
                           "group (megatron-core's BlendedDataset asks for the rank; one gloo rank will do); "
                           "or give a single path")
    return [os.path.abspath(p) for p in paths]


def _weights(
    weights: Any, prefixes: list[str], num_samples: Any, num_valid_samples: Any
) -> list[float] | None:
    if weights is None:
        return None
    weights = list(weights)
    if len(weights) != len(prefixes) or not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        raise option_error("text", "weights", weights, f"give {len(prefixes)} positive numbers, one per path")
    if num_samples is None or num_valid_samples is None:
        # Megatron sizes each dataset's share from the requested total, so it needs one per split.
        raise option_error("text", "weights", weights,
                           "weighted blends need num_samples and num_valid_samples")
    return [float(w) for w in weights]


def _check_split(split: Any) -> None:
    parts = re.findall(r"[.0-9]+", split) if isinstance(split, str) else []
    values = [float(p) for p in parts]
    if not 2 <= len(values) <= 3 or values[0] <= 0 or values[1] <= 0:
        raise option_error("text", "split", split, 'use "train,valid[,test]" shares with train and valid '
                           'positive, e.g. "98,2,0"')


def _build_splits(
    prefixes: list[str],
    weights: list[float] | None,
    sizes: list[int | None],
    split: str,
    cache_dir: str,
    seq_len: int,
    seed: int,
    tokenizer: _MegatronTokenizer,
) -> dict[str, Any]:
    import_megatron_datasets()
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    _check_split_sizes(prefixes, config.split_matrix, seq_len)
    # The test split is never read; size 0, not None: Megatron rejects a None size in a weighted blend.
    built = BlendedMegatronDatasetBuilder(GPTDataset, [*sizes, 0], lambda: True, config).build()
    return dict(zip(SPLITS, built[: len(SPLITS)], strict=True))


def _check_split_sizes(prefixes: list[str], split_matrix: list, seq_len: int) -> None:
    """Fail clearly where Megatron would not: a split with less than one sample of tokens makes it loop
    forever looking for enough epochs, or return an empty dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        # Copied while the dataset lives: its __del__ unmaps the buffer that sequence_lengths views.
        dataset = IndexedDataset(prefix)
        lengths = np.array(dataset.sequence_lengths)
        del dataset
        for name, bookends in zip(SPLITS, split_matrix[: len(SPLITS)], strict=True):
            # The same document ranges Megatron's builder takes for this split.
            begin, end = (round(b * len(lengths)) for b in bookends)
            tokens = int(lengths[begin:end].sum())
            if tokens < seq_len + 1:
                raise ValueError(
                    f"text option split: the {name} split of {prefix} has {end - begin} documents and "
                    f"{tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; use a larger corpus, a "
                    f"shorter seq_len or a larger {name} share in split")

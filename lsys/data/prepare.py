"""Turning raw text into a Megatron indexed dataset (`PREFIX.bin` / `PREFIX.idx`) plus `PREFIX.json`, the
metadata our text task needs and Megatron does not keep: the tokenizer, special ids and the byte count that
bits per byte is measured against."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lsys.data._megatron import import_megatron_datasets
from lsys.data.tokenizer import load_tokenizer

FORMAT_VERSION = 1
# Documents are tokenized in groups: the HuggingFace tokenizer encodes a batch in parallel.
ENCODE_GROUP = 512
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def prepare_text_dataset(
    input_paths: Sequence[str],
    output_prefix: str,
    tokenizer: str | None = None,
    append_eod: bool = True,
    eod_token: str | None = None,
) -> dict[str, Any]:
    """Tokenize `input_paths` into `output_prefix`.{bin,idx,json}; returns the metadata written to the json.

    Documents: in a `.jsonl` file, the "text" field of each line; in any other file (plain UTF-8 text), each
    paragraph, i.e. a run of lines between blank lines, with surrounding whitespace stripped. Empty documents
    are skipped. `tokenizer` None is byte-level (vocabulary 258: bytes, EOD 256, PAD 257), else the path of a
    HuggingFace tokenizer.json whose end-of-document token is found by name or given as `eod_token`.
    With `append_eod` every document ends with EOD, so a model sees where one text stops and the next begins.

    Tokens are stored as uint16 when the vocabulary fits, else int32: the rule Megatron's GPTDatasetConfig
    applies when it is told the vocabulary size. `num_bytes` counts the UTF-8 bytes of the documents as
    tokenized (what the model has to predict), so for the byte tokenizer
    num_tokens = num_bytes + num_documents.
    """
    import_megatron_datasets()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    if not input_paths:
        raise ValueError("input_paths=[]: give at least one .txt or .jsonl file")
    for path in input_paths:
        if not os.path.isfile(path):
            raise ValueError(f"input path {path!r}: no such file")
    tok = load_tokenizer(tokenizer, eod_token)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    builder = IndexedDatasetBuilder(get_bin_path(output_prefix), dtype=dtype)
    num_documents = num_tokens = num_bytes = 0
    for group in _groups(_documents(input_paths), ENCODE_GROUP):
        for text, ids in zip(group, tok.encode_batch(group), strict=True):
            if append_eod:
                ids.append(tok.eod)
            if not ids:
                continue
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            num_documents += 1
            num_tokens += len(ids)
            num_bytes += len(text.encode("utf-8"))
    builder.finalize(get_idx_path(output_prefix))
    if num_documents == 0:
        raise ValueError(f"input_paths={list(input_paths)!r}: no non-empty documents found")

    metadata = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.kind,
        "tokenizer_path": tok.path,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod,
        "pad_id": tok.pad,
        "append_eod": append_eod,
        "dtype": np.dtype(dtype).name,
        "num_documents": num_documents,
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
        "inputs": [os.path.abspath(p) for p in input_paths],
    }
    with open(metadata_path(output_prefix), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def metadata_path(prefix: str) -> str:
    return f"{prefix}.json"


def read_metadata(prefix: str) -> dict[str, Any]:
    """The metadata `prepare_text_dataset` wrote for `prefix`, with the dataset files checked to exist."""
    for suffix in (".bin", ".idx", ".json"):
        if not os.path.isfile(prefix + suffix):
            raise ValueError(f"text option path={prefix!r}: {prefix + suffix} is missing; make the dataset "
                             "with prepare_text_dataset (`lsys prepare-data INPUT OUT`)")
    with open(metadata_path(prefix), encoding="utf-8") as f:
        metadata = json.load(f)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"text option path={prefix!r}: metadata format {metadata.get('format_version')!r} "
                         f"is not {FORMAT_VERSION}; prepare the dataset again")
    return metadata


def _documents(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for line_no, line in enumerate(f, start=1):
                    text = _jsonl_text(line, path, line_no) if line.strip() else ""
                    if text.strip():
                        yield text
            else:
                for paragraph in _BLANK_LINE.split(f.read()):
                    if paragraph.strip():
                        yield paragraph.strip()


def _jsonl_text(line: str, path: str, line_no: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_no}: not a JSON object ({err.msg})") from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{line_no}: expected an object with a string field \"text\"")
    return record["text"]


def _groups(items: Iterator[str], size: int) -> Iterator[list[str]]:
    group: list[str] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group

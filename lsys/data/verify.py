"""Checking a prepared text dataset (`PREFIX.bin` / `PREFIX.idx` / `PREFIX.json`) before anything reads it,
so that a missing, truncated, corrupt or mismatched file stops with one line naming the file instead of a
megatron-core assert, a numpy error deep inside a rank, or samples read from garbage.

Two depths. The default checks structure and sizes: the metadata parses and has the current format, the
index header is Megatron's, the index size follows from its counts, the token file holds exactly the tokens
the index lists, and both sizes are the ones the metadata recorded. It reads the index's sequence lengths
(4 bytes per document) and only the size of the token file, so it is cheap enough to run before any rank
starts and again in every rank. `deep=True` also hashes both files against the sha256 the metadata recorded
and checks every sequence pointer: it reads every byte (about a second per GB), which catches bit rot and
same-size tampering, so it is for tests and for deliberate audits, not for every start.

Nothing here imports megatron-core (seconds to import): the index layout is read with `struct` and numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

# 2 records the size and sha256 of the .bin and .idx; datasets of format 1 must be prepared again.
FORMAT_VERSION = 2
SUFFIXES = (".bin", ".idx", ".json")

# Megatron's index layout (megatron.core.datasets.indexed_dataset._IndexWriter): magic, version 1, dtype
# code, sequence count, document count; then int32 sequence lengths, int64 sequence pointers (byte offsets
# into the .bin) and int64 document indices (document_count = sequences + 1 for our one-sequence documents).
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
# Megatron's DType codes for the two token dtypes prepare_text_dataset writes (a test compares them).
DTYPE_CODES = {"uint16": 8, "int32": 4}

# The metadata keys readers use, with their types (bool is not an int here).
_INT_KEYS = ("format_version", "vocab_size", "eod_id", "pad_id", "num_documents", "num_tokens", "num_bytes")
_AGAIN = "prepare the dataset again (`lsys prepare-data INPUT... PREFIX`)"
_HASH_CHUNK = 1 << 20


def default_cache_dir(prefix: str) -> str:
    """Where the text task keeps Megatron's index cache when `cache_dir` is not given."""
    return f"{os.path.abspath(prefix)}_cache"


def check_text_inputs(path: str | Sequence[str], cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Everything the text task with these options reads or writes, checked without megatron-core: each
    dataset prefix in `path` (`check_text_dataset`) and the index cache directory (`check_cache_dir`,
    `default_cache_dir` of the first prefix when `cache_dir` is None or ""). Returns the metadata per prefix.
    """
    prefixes = [path] if isinstance(path, str) else list(path)
    metadata = [check_text_dataset(p) for p in prefixes]
    check_cache_dir(cache_dir or default_cache_dir(prefixes[0]))
    return metadata


def check_text_dataset(prefix: str, deep: bool = False) -> dict[str, Any]:
    """The metadata of the dataset at `prefix`, after checking that its three files belong together and are
    whole (see the module docstring for what `deep` adds). Any problem is a ValueError naming the file."""
    paths = dict(zip(SUFFIXES, (prefix + s for s in SUFFIXES), strict=True))
    for path in paths.values():
        _check_readable(path, prefix)
    metadata = _read_metadata(paths[".json"])
    sizes = {suffix: os.path.getsize(paths[suffix]) for suffix in (".bin", ".idx")}
    lengths_sum = _check_index(paths[".idx"], sizes[".idx"], metadata, deep)
    expected = lengths_sum * np.dtype(metadata["dtype"]).itemsize
    if sizes[".bin"] != expected:
        hint = "truncated?" if sizes[".bin"] < expected else "appended to, or from another preparation?"
        raise ValueError(f"{paths['.bin']}: {sizes['.bin']} bytes, the index expects {expected} ({hint}); "
                         f"{_AGAIN}")
    for suffix, size in sizes.items():
        recorded = metadata["files"][suffix[1:]]["size"]
        if size != recorded:
            raise ValueError(f"{paths[suffix]}: {size} bytes, {paths['.json']} recorded {recorded}; the files "
                             f"come from different preparations; {_AGAIN}")
    if deep:
        for suffix in (".bin", ".idx"):
            digest, recorded = file_sha256(paths[suffix]), metadata["files"][suffix[1:]]["sha256"]
            if digest != recorded:
                raise ValueError(f"{paths[suffix]}: sha256 {digest} differs from {recorded} recorded in "
                                 f"{paths['.json']}; the file changed after it was prepared; {_AGAIN}")
    return metadata


def check_cache_dir(cache_dir: Any) -> None:
    """Megatron's index cache: an existing writable directory, or one that can be created. Under a process
    group rank 0 writes the cache while the other ranks wait at a barrier, so a failure there would leave
    them waiting; checked here so that it stops before training with the option named."""
    if not isinstance(cache_dir, str) or not cache_dir:
        raise ValueError(f"text option cache_dir={cache_dir!r}: give a directory path, or leave it empty for "
                         "one beside the dataset")
    probe = os.path.abspath(cache_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(cache_dir) else f"cannot be created: {probe} is a file"
        raise ValueError(f"text option cache_dir={cache_dir!r}: {where}; give a directory for megatron-core's "
                         "index cache")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"text option cache_dir={cache_dir!r}: {probe} is not writable; give a directory "
                         "this user can write for megatron-core's index cache")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_readable(path: str, prefix: str) -> None:
    if not os.path.lexists(path):
        raise ValueError(f"{path} is missing; make the dataset with `lsys prepare-data INPUT... {prefix}`")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file; {_AGAIN}")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from err


def _read_metadata(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON metadata ({err}); {_AGAIN}") from err
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: not a JSON object; {_AGAIN}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: metadata format {version!r} is not {FORMAT_VERSION}, the one this version "
                         f"of lsys reads; {_AGAIN}")
    for key in _INT_KEYS:
        value = metadata.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: {key}={value!r} is not an integer; {_AGAIN}")
    if metadata["num_documents"] < 1 or metadata["num_tokens"] < 1 or metadata["vocab_size"] < 1:
        raise ValueError(f"{path}: num_documents, num_tokens and vocab_size must be positive; {_AGAIN}")
    if not isinstance(metadata.get("tokenizer"), str) or metadata.get("dtype") not in DTYPE_CODES:
        raise ValueError(f"{path}: tokenizer={metadata.get('tokenizer')!r} or dtype={metadata.get('dtype')!r} "
                         f"is not valid; {_AGAIN}")
    files = metadata.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(files.get(name), dict)
        and isinstance(files[name].get("size"), int)
        and isinstance(files[name].get("sha256"), str)
        for name in ("bin", "idx")
    ):
        raise ValueError(f"{path}: files={files!r} does not record the size and sha256 of bin and idx; "
                         f"{_AGAIN}")
    return metadata


def _check_index(path: str, size: int, metadata: dict[str, Any], deep: bool) -> int:
    """Checks the index at `path` against its own counts and the metadata; returns its total token count."""
    with open(path, "rb") as f:
        header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise ValueError(f"{path}: {size} bytes, shorter than a Megatron index header ({_HEADER.size} bytes; "
                         f"truncated?); {_AGAIN}")
    magic, version, code, sequences, documents = _HEADER.unpack(header)
    if magic != _INDEX_MAGIC or version != _INDEX_VERSION:
        raise ValueError(f"{path}: not a Megatron index (header {header[:17]!r}, expected magic "
                         f"{_INDEX_MAGIC!r} and version {_INDEX_VERSION}); {_AGAIN}")
    if code != DTYPE_CODES[metadata["dtype"]]:
        raise ValueError(f"{path}: token dtype code {code}, but the metadata says {metadata['dtype']} (code "
                         f"{DTYPE_CODES[metadata['dtype']]}); {_AGAIN}")
    expected = _HEADER.size + 12 * sequences + 8 * documents
    if size != expected:
        hint = "truncated?" if size < expected else "trailing bytes?"
        raise ValueError(f"{path}: {size} bytes, its header ({sequences} sequences, {documents} documents) "
                         f"needs {expected} ({hint}); {_AGAIN}")
    if sequences != metadata["num_documents"] or documents != sequences + 1:
        raise ValueError(f"{path}: {sequences} sequences in {documents - 1} documents, the metadata records "
                         f"{metadata['num_documents']} one-sequence documents; {_AGAIN}")
    lengths = np.memmap(path, dtype=np.int32, mode="r", offset=_HEADER.size, shape=(sequences,))
    pointers = np.memmap(path, dtype=np.int64, mode="r", offset=_HEADER.size + 4 * sequences,
                         shape=(sequences,))
    bounds = np.memmap(path, dtype=np.int64, mode="r", offset=_HEADER.size + 12 * sequences,
                       shape=(documents,))
    total = int(lengths.sum(dtype=np.int64))
    itemsize = np.dtype(metadata["dtype"]).itemsize
    ends = (int(pointers[0]), int(pointers[-1]) + int(lengths[-1]) * itemsize, int(bounds[0]), int(bounds[-1]))
    if int(lengths.min()) < 1 or total != metadata["num_tokens"] or ends != (0, total * itemsize, 0, sequences):
        raise ValueError(f"{path}: sequence lengths, pointers or document bounds are corrupt (or the tokens "
                         f"add up to {total}, not the {metadata['num_tokens']} the metadata records); {_AGAIN}")
    if deep:
        starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * itemsize
        if not np.array_equal(starts, pointers) or not np.array_equal(bounds, np.arange(documents)):
            raise ValueError(f"{path}: sequence pointers or document bounds are corrupt; {_AGAIN}")
    return total

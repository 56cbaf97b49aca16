"""Turning raw text into a Megatron indexed dataset (`PREFIX.bin` / `PREFIX.idx`) plus `PREFIX.json`, the
metadata our text task needs and Megatron does not keep: the tokenizer, special ids, the byte count that
bits per byte is measured against, and the size and sha256 of the other two files.

Preparation never damages what is there. All three files are written into a fresh directory beside the
output (same file system, so renaming is atomic), validated, flushed to disk, and only then renamed over the
old ones: .bin, .idx, then .json. Any failure before that, an interrupt included, removes the directory and
leaves the old dataset byte for byte as it was. The residual window is the three renames themselves: a reader
that looks in between sees the new .bin beside the old .idx/.json, which `check_text_dataset` rejects by
size (the new files' sizes are recorded only in the new .json); an open reader keeps reading the old files,
which a rename does not touch. Only a hard kill leaves the staging directory (`.PREFIX.*.tmp/`) behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lsys.data._megatron import import_megatron_datasets
from lsys.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from lsys.data.verify import FORMAT_VERSION, SUFFIXES, check_text_dataset, file_sha256

# Documents are tokenized in groups: the HuggingFace tokenizer encodes a batch in parallel.
ENCODE_GROUP = 512
# A line of only these characters (or none) ends a paragraph; Unicode spaces such as U+00A0 do not.
_BLANK = " \t\r\f\v"


def prepare_text_dataset(
    input_paths: Sequence[str],
    output_prefix: str,
    tokenizer: str | None = None,
    append_eod: bool = True,
    eod_token: str | None = None,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Tokenize `input_paths` into `output_prefix`.{bin,idx,json}; returns the metadata written to the json.

    Documents: in a `.jsonl` file, the "text" field of each line; in any other file (plain UTF-8 text), each
    paragraph, i.e. a run of lines between blank lines, with surrounding whitespace stripped. Empty documents
    are skipped. `tokenizer` None is byte-level (vocabulary 258: bytes, EOD 256, PAD 257), else the path of a
    HuggingFace tokenizer.json whose end-of-document token is found by name or given as `eod_token`;
    `pretrained` (a HuggingFace model directory) with no `tokenizer`: its tokenizer.json and the `eos_token_id`
    of its config.json.
    With `append_eod` every document ends with EOD, so a model sees where one text stops and the next begins.

    Tokens are stored as uint16 when the vocabulary fits, else int32: the rule Megatron's GPTDatasetConfig
    applies when it is told the vocabulary size. `num_bytes` counts the UTF-8 bytes of the documents as
    tokenized (what the model has to predict), so for the byte tokenizer
    num_tokens = num_bytes + num_documents.

    Bad input (a missing or unreadable file, a line that is not a JSON object, text that is not UTF-8, no
    documents at all, a bad tokenizer) raises ValueError naming the file and line; then, as after any other
    failure, the files at `output_prefix` are unchanged and nothing else is left behind.
    """
    if not input_paths:
        raise ValueError("input_paths=[]: give at least one .txt or .jsonl file")
    targets = [os.path.abspath(output_prefix) + suffix for suffix in SUFFIXES]
    for path in input_paths:
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "no such file"
            raise ValueError(f"input {path}: {what}; give .txt or .jsonl files")
        if os.path.abspath(path) in targets:
            raise ValueError(f"input {path}: is one of the files the output {output_prefix} replaces; choose "
                             "another output prefix")
    tok = load_tokenizer(tokenizer, eod_token, pretrained)
    staging = _staging_dir(output_prefix, targets)
    try:
        staged = os.path.join(staging, "dataset")
        try:
            metadata = _write(staged, input_paths, tok, append_eod)
        except OSError as err:
            raise ValueError(f"{output_prefix}: writing the dataset failed ({err}); the old files, if any, are "
                             "unchanged") from err
        # Read back through the checks every reader applies: what is renamed into place passes them.
        check_text_dataset(staged)
        for suffix, target in zip(SUFFIXES, targets, strict=True):
            os.replace(staged + suffix, target)
        # Some file systems cannot sync a directory; the renames are done either way.
        with contextlib.suppress(OSError):
            _fsync(os.path.dirname(targets[0]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def _staging_dir(output_prefix: str, targets: list[str]) -> str:
    """A fresh directory beside the output, for the three files until they are complete. Files created in it
    get the usual permissions (mkstemp's would be private to this user)."""
    out_dir, name = os.path.split(os.path.abspath(output_prefix))
    if os.path.basename(output_prefix) in ("", ".", ".."):
        raise ValueError(f"output prefix {output_prefix!r}: name the dataset, e.g. data/corpus (which writes "
                         "data/corpus.bin, .idx and .json)")
    for target in targets:
        if os.path.lexists(target) and not os.path.isfile(target):
            raise ValueError(f"output {target}: exists and is not a regular file; remove it or choose another "
                             "output prefix")
    try:
        os.makedirs(out_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    except OSError as err:
        raise ValueError(f"output directory {out_dir}: cannot write there ({err.strerror})") from err


def _write(
    prefix: str, input_paths: Sequence[str], tok: ByteTokenizer | HFTokenizer, append_eod: bool
) -> dict[str, Any]:
    """The dataset at `prefix` (in the staging directory), flushed to disk; returns its metadata."""
    import_megatron_datasets()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    num_documents = num_tokens = num_bytes = 0
    try:
        for group in _groups(_documents(input_paths), ENCODE_GROUP):
            texts = [text for text, _ in group]
            for (_, size), ids in zip(group, tok.encode_batch(texts), strict=True):
                if append_eod:
                    ids.append(tok.eod)
                if not ids:
                    continue
                if max(ids) >= tok.vocab_size:
                    # A tokenizer.json whose ids leave gaps: such an id would index past the embedding.
                    raise ValueError(f"tokenizer {tok.path}: produced id {max(ids)}, not below its vocabulary "
                                     f"size {tok.vocab_size}; use a tokenizer with contiguous ids")
                builder.add_item(torch.tensor(ids, dtype=torch.int64))
                builder.end_document()
                num_documents += 1
                num_tokens += len(ids)
                num_bytes += size
    finally:
        builder.data_file.close()
    if num_documents == 0:
        raise ValueError(f"{', '.join(input_paths)}: no non-empty documents found; give text to tokenize")
    builder.finalize(prefix + ".idx")

    files = {}
    for suffix in (".bin", ".idx"):
        _fsync(prefix + suffix)
        files[suffix[1:]] = {"size": os.path.getsize(prefix + suffix), "sha256": file_sha256(prefix + suffix)}
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
        "files": files,
        "inputs": [os.path.abspath(p) for p in input_paths],
    }
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    _fsync(prefix + ".json")
    return metadata


def _fsync(path: str) -> None:
    """Flush `path` (a file or a directory: then its entries, i.e. the renames) to disk, so that a crash
    after the renames cannot leave the new names on empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _documents(paths: Sequence[str]) -> Iterator[tuple[str, int]]:
    """Each document as (text, its UTF-8 size in bytes)."""
    for path in paths:
        if path.endswith(".jsonl"):
            for line_no, line in _lines(path):
                text = _jsonl_text(line, path, line_no) if line.strip() else ""
                if text.strip():
                    yield text, _utf8_size(text, path, line_no)
        else:
            paragraph: list[str] = []
            for _, line in _lines(path):
                # Line ends as Python's universal newlines read them: "\n", "\r\n" or a lone "\r".
                pieces = line.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                if line.endswith(("\n", "\r")):
                    pieces.pop()
                for piece in pieces:
                    if piece.strip(_BLANK):
                        paragraph.append(piece)
                    elif paragraph:
                        yield from _paragraph(paragraph)
                        paragraph = []
            yield from _paragraph(paragraph)


def _paragraph(lines: list[str]) -> Iterator[tuple[str, int]]:
    text = "\n".join(lines).strip()
    if text:
        yield text, len(text.encode("utf-8"))


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of `path`, decoded here rather than by `open` so that an error can
    say where the bad byte is (a multi-byte UTF-8 character never contains the byte of "\\n")."""
    offset = 0
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                                     f"{offset + err.start}); convert it to UTF-8") from err
                offset += len(raw)
                yield line_no, line
    except OSError as err:
        raise ValueError(f"input {path}: cannot be read ({err.strerror})") from err


def _jsonl_text(line: str, path: str, line_no: int) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise ValueError(f"{path}:{line_no}: not a JSON object ({reason})") from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{line_no}: expected an object with a string field \"text\"")
    return record["text"]


def _utf8_size(text: str, path: str, line_no: int) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ValueError(f"{path}:{line_no}: \"text\" holds an unpaired surrogate (\\u{ord(text[err.start]):04x}), "
                         "which is not Unicode text; fix its escapes") from err


def _groups(items: Iterator[tuple[str, int]], size: int) -> Iterator[list[tuple[str, int]]]:
    group: list[tuple[str, int]] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group

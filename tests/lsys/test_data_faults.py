"""Text datasets under bad input and damaged files: preparation that fails changes nothing, success replaces
everything, and a truncated, corrupt or mismatched dataset or tokenizer stops with a ValueError naming the
file, both from the check and from building the text task."""

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

from lsys.data import build_task, check_text_dataset, check_text_inputs, load_tokenizer, prepare_text_dataset
from lsys.data import prepare as prepare_module
from lsys.data.tokenizer import ByteTokenizer
from lsys.data.verify import DTYPE_CODES, check_cache_dir

SUFFIXES = (".bin", ".idx", ".json")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _paragraphs(seed: int, count: int, words: tuple[str, ...] = ("old", "river", "stone", "café")) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(count))


def _snapshot(directory) -> dict[str, str]:
    """Every entry of `directory` (hidden ones too) with the sha256 of its bytes, or "dir"."""
    return {
        entry.name: "dir" if entry.is_dir() else hashlib.sha256(entry.read_bytes()).hexdigest()
        for entry in directory.iterdir()
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A good dataset, prepared once; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "a.txt").write_text(_paragraphs(0, 40), encoding="utf-8")
    prepare_text_dataset([str(root / "a.txt")], str(root / "corpus"))
    return root / "corpus"


@pytest.fixture
def dataset(prepared, tmp_path):
    """A fresh copy of the good dataset at tmp_path/out/corpus, and a directory for inputs."""
    (tmp_path / "out").mkdir()
    (tmp_path / "in").mkdir()
    for suffix in SUFFIXES:
        shutil.copyfile(f"{prepared}{suffix}", tmp_path / "out" / f"corpus{suffix}")
    return tmp_path / "out" / "corpus"


# -- preparation: failures change nothing --------------------------------------------------------------------

BAD_INPUTS = [
    ("corpus.jsonl", b'{"text": "one"}\n{"text": "two"}\nnot json\n', r"corpus\.jsonl:3: not a JSON object \("),
    ("list.jsonl", b'{"text": "one"}\n[1, 2]\n', r"list\.jsonl:2: expected an object with a string field"),
    ("notes.txt", b"hello world\n\nabc \xff def\n",
     r"notes\.txt:3: not UTF-8 text \(byte 0xff at offset 17\); convert it to UTF-8"),
    ("cut.txt", b"abc\xe2\x82", r"cut\.txt:1: not UTF-8 text \(byte 0xe2 at offset 3\)"),
    ("empty.txt", b"  \n\n\t\n", r"empty\.txt: no non-empty documents found"),
    ("surrogate.jsonl", b'{"text": "a\\ud800b"}\n', r"surrogate\.jsonl:1: .*unpaired surrogate \(\\ud800\)"),
]


@pytest.mark.parametrize("name, content, match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_leaves_the_existing_dataset_byte_identical(dataset, name, content, match):
    good = dataset.parent.parent / "in" / "good.txt"
    good.write_text(_paragraphs(5, 30), encoding="utf-8")
    bad = dataset.parent.parent / "in" / name
    bad.write_bytes(content)
    # A good file first, so that the bad one fails after tokens were written; alone when it has no documents.
    inputs = [str(bad)] if name == "empty.txt" else [str(good), str(bad)]
    before = _snapshot(dataset.parent)
    with pytest.raises(ValueError, match=match):
        prepare_text_dataset(inputs, str(dataset))
    assert _snapshot(dataset.parent) == before
    check_text_dataset(str(dataset), deep=True)


def test_bad_tokenizer_or_output_leaves_everything_as_it_was(dataset):
    text = dataset.parent.parent / "in" / "a.txt"
    text.write_text("some text", encoding="utf-8")
    broken = dataset.parent.parent / "in" / "tokenizer.json"
    broken.write_text('{"model": ', encoding="utf-8")
    before = _snapshot(dataset.parent)
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer\.json: not a HuggingFace tokenizer\.json"):
        prepare_text_dataset([str(text)], str(dataset), tokenizer=str(broken))
    with pytest.raises(ValueError, match=r"input .*missing\.txt: no such file"):
        prepare_text_dataset([str(text), str(text.parent / "missing.txt")], str(dataset))
    with pytest.raises(ValueError, match=r"input .*corpus\.json: is one of the files the output"):
        prepare_text_dataset([f"{dataset}.json"], str(dataset))
    with pytest.raises(ValueError, match=r"output prefix '.*out/': name the dataset"):
        prepare_text_dataset([str(text)], f"{dataset.parent}/")
    assert _snapshot(dataset.parent) == before
    (dataset.parent / "taken.idx").mkdir()
    with pytest.raises(ValueError, match=r"taken\.idx: exists and is not a regular file"):
        prepare_text_dataset([str(text)], str(dataset.parent / "taken"))
    assert sorted(_snapshot(dataset.parent)) == sorted([*before, "taken.idx"])


def test_interrupt_mid_write_leaves_nothing_behind(dataset, monkeypatch):
    text = dataset.parent.parent / "in" / "a.txt"
    text.write_text(_paragraphs(9, 20), encoding="utf-8")
    before = _snapshot(dataset.parent)
    calls = []
    watched = [dataset.parent]
    encode = ByteTokenizer.encode_batch

    def interrupted(self, texts):
        calls.append(len(texts))
        if len(calls) == 3:
            # Two groups are in the staging directory's .bin by now.
            assert any(name.startswith(".corpus.") for name in os.listdir(watched[0]))
            raise KeyboardInterrupt
        return encode(self, texts)

    monkeypatch.setattr(prepare_module, "ENCODE_GROUP", 4)
    monkeypatch.setattr(ByteTokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_text_dataset([str(text)], str(dataset))
    assert len(calls) == 3
    assert _snapshot(dataset.parent) == before
    # Into an empty directory: nothing at all is left.
    fresh = dataset.parent.parent / "fresh"
    fresh.mkdir()
    calls.clear()
    watched[0] = fresh
    with pytest.raises(KeyboardInterrupt):
        prepare_text_dataset([str(text)], str(fresh / "corpus"))
    assert list(fresh.iterdir()) == []


def test_success_replaces_the_whole_dataset(dataset, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    before = _snapshot(dataset.parent)
    docs = [f"document {i} " + "z" * i for i in range(1, 12)]
    (tmp_path / "in" / "new.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    stats = prepare_text_dataset([str(tmp_path / "in" / "new.jsonl")], str(dataset))
    after = _snapshot(dataset.parent)
    assert sorted(after) == sorted(before) == ["corpus.bin", "corpus.idx", "corpus.json"]
    assert all(after[name] != before[name] for name in after)
    assert check_text_dataset(str(dataset), deep=True) == stats
    assert stats["files"]["bin"] == {"size": (dataset.parent / "corpus.bin").stat().st_size,
                                     "sha256": after["corpus.bin"]}
    read = IndexedDataset(str(dataset))
    assert [read[i].tolist() for i in range(len(read))] == [list(d.encode()) + [256] for d in docs]


def test_paragraphs_split_at_blank_lines_whatever_the_line_ends(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    (tmp_path / "mixed.txt").write_bytes(b"one\r\nline two\r\n \t\r\n\rthree\rfour\n\n\xc2\xa0\n\nfive \r")
    prepare_text_dataset([str(tmp_path / "mixed.txt")], str(tmp_path / "mixed"), append_eod=False)
    read = IndexedDataset(str(tmp_path / "mixed"))
    assert [bytes(read[i].tolist()) for i in range(len(read))] == [b"one\nline two", b"three\nfour", b"five"]


# -- damaged datasets: one line naming the file ---------------------------------------------------------------


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _edit_json(path, **changes):
    metadata = json.loads(path.read_text())
    metadata.update(changes)
    path.write_text(json.dumps(metadata))


def _write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated bin": (lambda p: _truncate(f"{p}.bin", os.path.getsize(f"{p}.bin") - 2),
                      r"corpus\.bin: \d+ bytes, the index expects \d+ \(truncated\?\); prepare the dataset again"),
    "bin of the wrong size": (lambda p: _write_at(f"{p}.bin", os.path.getsize(f"{p}.bin"), b"\0\0"),
                              r"corpus\.bin: \d+ bytes, the index expects \d+ \(appended to"),
    "truncated idx": (lambda p: _truncate(f"{p}.idx", os.path.getsize(f"{p}.idx") - 8),
                      r"corpus\.idx: \d+ bytes, its header \(40 sequences, 41 documents\) needs \d+ \(truncated"),
    "idx shorter than its header": (lambda p: _truncate(f"{p}.idx", 10),
                                    r"corpus\.idx: 10 bytes, shorter than a Megatron index header"),
    "corrupt idx header": (lambda p: _write_at(f"{p}.idx", 0, b"NOTANIDX"),
                           r"corpus\.idx: not a Megatron index"),
    # The first int32 sequence length follows the 34-byte header; its high byte makes it about 2**31.
    "corrupt idx lengths": (lambda p: _write_at(f"{p}.idx", 34 + 3, b"\x7f"),
                            r"corpus\.idx: sequence lengths, pointers or document bounds are corrupt"),
    "missing json": (lambda p: os.remove(f"{p}.json"), r"corpus\.json is missing; make the dataset"),
    "missing bin": (lambda p: os.remove(f"{p}.bin"), r"corpus\.bin is missing"),
    "json of an old format": (lambda p: _edit_json(p.parent / "corpus.json", format_version=1),
                              r"corpus\.json: metadata format 1 is not 2.*prepare the dataset again"),
    "json not json": (lambda p: (p.parent / "corpus.json").write_text("{'format_version': 2"),
                      r"corpus\.json: not valid JSON metadata"),
    "json sizes of another preparation": (
        lambda p: _edit_json(p.parent / "corpus.json", files={"bin": {"size": 1, "sha256": ""},
                                                              "idx": {"size": 2, "sha256": ""}}),
        r"corpus\.bin: \d+ bytes, .*corpus\.json recorded 1; the files come from different preparations"),
    "json without a key": (lambda p: _edit_json(p.parent / "corpus.json", vocab_size=None),
                           r"corpus\.json: vocab_size=None is not an integer"),
    "bin is a directory": (lambda p: (os.remove(f"{p}.bin"), os.mkdir(f"{p}.bin")),
                           r"corpus\.bin: not a regular file"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_dataset_is_refused_naming_the_file(dataset, tmp_path, damage):
    spoil, match = DAMAGE[damage]
    spoil(dataset)
    for deep in (False, True):
        with pytest.raises(ValueError, match=match):
            check_text_dataset(str(dataset), deep=deep)
    with pytest.raises(ValueError, match=match):
        build_task("text", 16, seed=0, path=str(dataset), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=match):
        check_text_inputs(str(dataset))
    assert not (tmp_path / "cache").exists()


def test_same_size_tampering_needs_the_deep_check(dataset):
    _flip_last_byte(dataset.parent / "corpus.bin")
    check_text_dataset(str(dataset))
    with pytest.raises(ValueError, match=r"corpus\.bin: sha256 [0-9a-f]{64} differs from [0-9a-f]{64} recorded "
                                         r"in .*corpus\.json; the file changed after it was prepared"):
        check_text_dataset(str(dataset), deep=True)


def test_files_of_two_preparations_do_not_pass_as_one(dataset, tmp_path):
    (tmp_path / "in" / "other.txt").write_text(_paragraphs(3, 40), encoding="utf-8")
    prepare_text_dataset([str(tmp_path / "in" / "other.txt")], str(tmp_path / "other"))
    # The same number of documents, so only the sizes and token counts tell them apart.
    shutil.copyfile(tmp_path / "other.idx", f"{dataset}.idx")
    with pytest.raises(ValueError, match=r"corpus\.idx: .*tokens add up to \d+, not the \d+ the metadata records"):
        check_text_dataset(str(dataset))
    shutil.copyfile(tmp_path / "other.bin", f"{dataset}.bin")
    with pytest.raises(ValueError, match=r"corpus\.idx: .*tokens add up to"):
        check_text_dataset(str(dataset))
    shutil.copyfile(tmp_path / "other.json", f"{dataset}.json")
    check_text_dataset(str(dataset), deep=True)


def test_dataset_prepared_again_gets_fresh_megatron_indices(tmp_path):
    # Megatron names its cached indices by the dataset's path; lsys adds the data's sha256 to that name.
    cache = str(tmp_path / "cache")
    (tmp_path / "a.txt").write_text(_paragraphs(1, 30), encoding="utf-8")
    (tmp_path / "b.txt").write_text(_paragraphs(2, 30, ("x", "yy", "zzzzz")), encoding="utf-8")
    prepare_text_dataset([str(tmp_path / "a.txt")], str(tmp_path / "corpus"))
    options = {"path": str(tmp_path / "corpus"), "split": "80,20,0"}
    first = build_task("text", 16, seed=0, cache_dir=cache, **options).batch(range(4))
    prepare_text_dataset([str(tmp_path / "b.txt")], str(tmp_path / "corpus"))
    again = build_task("text", 16, seed=0, cache_dir=cache, **options).batch(range(4))
    fresh = build_task("text", 16, seed=0, cache_dir=str(tmp_path / "fresh"), **options).batch(range(4))
    torch.testing.assert_close(again.tokens, fresh.tokens)
    assert not torch.equal(again.tokens, first.tokens)


def test_index_dtype_codes_are_megatrons():
    from megatron.core.datasets.indexed_dataset import DType

    assert {name: DType.code_from_dtype(getattr(np, name)) for name in DTYPE_CODES} == DTYPE_CODES


# -- the index cache directory -----------------------------------------------------------------------------


def test_cache_dir_that_cannot_be_written_is_refused(dataset, tmp_path):
    (tmp_path / "a_file").write_text("")
    for cache_dir, match in (
        (tmp_path / "a_file", r"cache_dir='.*a_file': is a file"),
        (tmp_path / "a_file" / "sub", r"cache_dir='.*sub': cannot be created: .*a_file is a file"),
    ):
        with pytest.raises(ValueError, match=match):
            build_task("text", 16, seed=0, path=str(dataset), cache_dir=str(cache_dir))
        with pytest.raises(ValueError, match=match):
            check_text_inputs(str(dataset), str(cache_dir))
    with pytest.raises(ValueError, match=r"cache_dir=3: give a directory path"):
        build_task("text", 16, seed=0, path=str(dataset), cache_dir=3)
    check_cache_dir(str(tmp_path / "new" / "deeper"))
    assert check_text_inputs(str(dataset), str(tmp_path / "new")) == [check_text_dataset(str(dataset))]


@pytest.mark.skipif(IS_ROOT, reason="root may write anywhere")
def test_read_only_cache_dir_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(ValueError, match=r"cache_dir='.*ro/cache': .*ro is not writable"):
        check_cache_dir(str(tmp_path / "ro" / "cache"))


# -- tokenizers -------------------------------------------------------------------------------------------

BAD_TOKENIZERS = {
    "invalid JSON": (lambda p: p.write_text('{"model": '), r"not a HuggingFace tokenizer\.json \(EOF"),
    "JSON but not a tokenizer": (lambda p: p.write_text("[1, 2]"),
                                 r"not a HuggingFace tokenizer\.json \(invalid type: sequence"),
    "an object but not a tokenizer": (lambda p: p.write_text('{"vocab": {}}'),
                                      r"not a HuggingFace tokenizer\.json"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff\xfe{}"), r"cannot be read \(not UTF-8 text\)"),
    "a directory": (lambda p: p.mkdir(), r"cannot be read \(Is a directory\)"),
    "missing": (lambda p: None, r"no such file; give the path of a tokenizer\.json"),
}


@pytest.mark.parametrize("case", BAD_TOKENIZERS)
def test_malformed_tokenizer_is_refused_naming_the_file(tmp_path, case):
    make, match = BAD_TOKENIZERS[case]
    path = tmp_path / "tok.json"
    make(path)
    with pytest.raises(ValueError, match=rf"^tokenizer {re.escape(str(path))}: {match}"):
        load_tokenizer(str(path))


@pytest.mark.skipif(IS_ROOT, reason="root may read anything")
def test_unreadable_tokenizer_is_refused(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("{}")
    path.chmod(0)
    with pytest.raises(ValueError, match=r"tok\.json: cannot be read \(Permission denied\)"):
        load_tokenizer(str(path))

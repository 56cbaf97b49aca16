"""Text data for a pretrained model: `prepare-data --pretrained DIR` tokenizes with DIR's tokenizer.json and ends
documents with its config.json's eos_token_id; the model's vocabulary is the checkpoint's; an export of such a run
carries that tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lsys.config import load_config
from lsys.data import model_vocabulary, prepare_text_dataset
from lsys.hf.export import tokenizer_files

tokenizers = pytest.importorskip("tokenizers")

SHAPE = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1"]


def _model_dir(path: Path, vocab: dict[str, int], specials: list[str], **config) -> Path:
    path.mkdir()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128, **config}))
    return path


def _tokens(prefix: Path) -> list[int]:
    return np.fromfile(f"{prefix}.bin", dtype=np.uint16).tolist()


def test_eod_is_the_configs_first_eos_token_id(tmp_path):
    # No special token has a known EOD name: only config.json says which id ends a text.
    vocab = {"<unk>": 0, "hello": 1, "world": 2, "<|im_end|>": 3, "<|stop|>": 4}
    model = _model_dir(tmp_path / "model", vocab, ["<|im_end|>", "<|stop|>"], eos_token_id=[4, 3])
    (tmp_path / "in.txt").write_text("hello world\n\nworld\n")
    stats = prepare_text_dataset([str(tmp_path / "in.txt")], str(tmp_path / "corpus"), pretrained=str(model))
    assert stats["eod_id"] == 4 and stats["tokenizer_path"] == str(model / "tokenizer.json")
    assert _tokens(tmp_path / "corpus") == [1, 2, 4, 2, 4]


def test_without_eos_token_id_a_known_eod_special_is_used(tmp_path):
    model = _model_dir(tmp_path / "model", {"<unk>": 0, "</s>": 1, "hello": 2}, ["</s>"])
    (tmp_path / "in.txt").write_text("hello\n")
    stats = prepare_text_dataset([str(tmp_path / "in.txt")], str(tmp_path / "corpus"), pretrained=str(model))
    assert stats["eod_id"] == 1 and _tokens(tmp_path / "corpus") == [2, 1]


def test_text_run_vocabulary_and_export_tokenizer(tmp_path):
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2}
    model = _model_dir(tmp_path / "model", vocab, ["</s>"], eos_token_id=1)
    (tmp_path / "in.txt").write_text("hello\n")
    prepare_text_dataset([str(tmp_path / "in.txt")], str(tmp_path / "corpus"), pretrained=str(model))
    text = ["data.task=text", f"data.text.path={tmp_path / 'corpus'}"]
    cfg = load_config(None, [*SHAPE, *text, f"model.pretrained={model}"])
    assert model_vocabulary(cfg, 3) == 300  # the checkpoint's, above the tokenizer's 3
    # An lsys model trained on that data (no pretrained weights) exports the dataset's tokenizer.
    assert tokenizer_files(load_config(None, [*SHAPE, *text])) == {"tokenizer.json": model / "tokenizer.json"}
    # A pretrained model exports its directory's files.
    assert tokenizer_files(cfg) == {"tokenizer.json": model / "tokenizer.json"}

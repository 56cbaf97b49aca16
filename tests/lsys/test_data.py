import itertools
import json
import math
import random

import pytest
import torch

from lsys.data import TASK_TYPES, TASKS, Batch, EvalTotals, build_task, mqar, passkey, prepare_text_dataset
from lsys.data.task import sample_seed
from tests.distributed import run_ranks

SYNTHETIC = {"passkey": {"key_len": 4}, "mqar": {"num_pairs": 6, "num_queries": 4}}


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_same_index_gives_the_same_sample_in_separate_builds(kind):
    a = build_task(kind, 64, seed=7, **SYNTHETIC[kind])
    b = build_task(kind, 64, seed=7, **SYNTHETIC[kind])
    for index in (0, 1, 17, 10**9):
        for split in ("train", "valid"):
            for key, value in a.sample(index, split).items():
                torch.testing.assert_close(value, b.sample(index, split)[key])


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_seed_and_split_change_the_samples(kind):
    base = build_task(kind, 64, seed=7, **SYNTHETIC[kind])
    other_seed = build_task(kind, 64, seed=8, **SYNTHETIC[kind])
    for index in range(8):
        tokens = base.sample(index)["tokens"]
        assert not torch.equal(tokens, other_seed.sample(index)["tokens"])
        assert not torch.equal(tokens, base.sample(index, "valid")["tokens"])
        assert not torch.equal(tokens, base.sample(index + 1)["tokens"])


def test_sample_seed_is_a_fixed_function_of_its_inputs():
    # A change here silently changes every dataset: bump it only on purpose.
    assert sample_seed(0, "train", 0) == 0x238275BC38FCBE91
    seeds = {sample_seed(s, split, i) for s in range(4) for split in ("train", "valid") for i in range(64)}
    assert len(seeds) == 4 * 2 * 64


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_batch_shapes_dtypes_and_positions(kind):
    task = build_task(kind, 48, seed=0, **SYNTHETIC[kind])
    batch = task.batch([3, 1, 4])
    assert isinstance(batch, Batch)
    for name, dtype in (("tokens", torch.int64), ("labels", torch.int64), ("loss_mask", torch.bool),
                        ("positions", torch.int64)):
        value = getattr(batch, name)
        assert value.shape == (3, 48) and value.dtype == dtype, name
    torch.testing.assert_close(batch.positions, torch.arange(48).expand(3, 48))
    assert int(batch.tokens.min()) >= 0 and int(batch.tokens.max()) < task.vocab_size
    torch.testing.assert_close(batch.labels[:, :-1], batch.tokens[:, 1:])
    assert not batch.loss_mask[:, -1].any()
    torch.testing.assert_close(batch.tokens[1], task.sample(1)["tokens"])


def test_passkey_layout_answer_and_targets():
    k, seq_len = 4, 40
    task = build_task("passkey", seq_len, seed=3, key_len=k)
    assert task.vocab_size == 4 + k * 10 + 16 and task.metric_name == "passkey_accuracy"
    depths = set()
    for index in range(200):
        s = task.sample(index)
        tokens, labels, mask = s["tokens"], s["labels"], s["loss_mask"]
        assert tokens.shape == (seq_len,) and tokens[0] == passkey.BOS
        key_at = (tokens == passkey.KEY).nonzero().flatten().tolist()
        assert len(key_at) == 2 and key_at[1] == seq_len - k - 1
        assert (tokens == passkey.QUERY).nonzero().flatten().tolist() == [seq_len - k - 2]
        hidden, answer = tokens[key_at[0] + 1 : key_at[0] + 1 + k], tokens[-k:]
        torch.testing.assert_close(answer, hidden)
        for j, digit in enumerate(hidden.tolist()):
            assert passkey.FIRST_DIGIT + 10 * j <= digit < passkey.FIRST_DIGIT + 10 * (j + 1)
        filler = torch.cat([tokens[1 : key_at[0]], tokens[key_at[0] + 1 + k : seq_len - k - 2]])
        assert len(filler) == seq_len - 2 * k - 4 and bool((filler >= 4 + 10 * k).all())
        assert int(mask.sum()) == k and mask[seq_len - k - 1 : seq_len - 1].all()
        torch.testing.assert_close(labels[mask], hidden)
        torch.testing.assert_close(labels[:-1], tokens[1:])
        depths.add(key_at[0])
    # Depth is uniform over the whole filler: both ends and most places between occur.
    assert min(depths) == 1 and max(depths) == 1 + seq_len - 2 * k - 4 and len(depths) > 15


def test_mqar_layout_and_recall_targets():
    n, q, seq_len = 6, 4, 40
    task = build_task("mqar", seq_len, seed=5, num_pairs=n, num_queries=q)
    first_value, first_filler = mqar.FIRST_KEY + 32, mqar.FIRST_KEY + 64
    assert task.vocab_size == first_filler + 16 and task.metric_name == "recall_accuracy"
    for index in range(50):
        s = task.sample(index)
        tokens, labels, mask = s["tokens"].tolist(), s["labels"], s["loss_mask"]
        assert tokens[0] == mqar.BOS and len(tokens) == seq_len
        keys, values = tokens[1 : 1 + 2 * n : 2], tokens[2 : 2 + 2 * n : 2]
        assert len(set(keys)) == n and all(mqar.FIRST_KEY <= key < first_value for key in keys)
        assert all(first_value <= v < first_filler for v in values)
        assert all(t >= first_filler for t in tokens[1 + 2 * n : seq_len - 2 * q])
        binding = dict(zip(keys, values, strict=True))
        asked = tokens[seq_len - 2 * q :: 2]
        assert len(set(asked)) == q and set(asked) <= set(keys)
        assert tokens[seq_len - 2 * q + 1 :: 2] == [binding[key] for key in asked]
        assert mask.nonzero().flatten().tolist() == list(range(seq_len - 2 * q, seq_len, 2))
        assert labels[mask].tolist() == [binding[key] for key in asked]


def test_mqar_asks_every_key_by_default():
    task = build_task("mqar", 64, seed=0, num_pairs=5)
    assert task.num_queries == 5 and int(task.sample(0)["loss_mask"].sum()) == 5


def test_eval_totals_of_hand_made_predictions():
    task = build_task("passkey", 16, seed=0, key_len=4)
    batch = task.batch([0, 1])
    losses = torch.full((2, 16), float("nan"))
    losses[batch.loss_mask] = torch.tensor([0.5, 0.25, 0.25, 1.0, 0.0, 0.0, 1.0, 1.0])

    perfect = task.eval_totals(batch, batch.labels.clone(), losses)
    counts = (perfect.tokens, perfect.correct_tokens, perfect.sequences, perfect.correct_sequences)
    assert counts == (8, 8, 2, 2)
    assert perfect.metric("passkey_accuracy") == 1.0 and perfect.metric("recall_accuracy") == 1.0
    assert perfect.loss_sum == pytest.approx(4.0) and perfect.loss == pytest.approx(0.5)
    assert math.isnan(perfect.metric("bits_per_byte"))

    wrong = batch.labels.clone()
    wrong[0, -2] = 0  # the last digit of the first answer
    wrong[1, 0] = 0  # not a target: must not count
    one_off = task.eval_totals(batch, wrong, losses)
    assert one_off.metric("passkey_accuracy") == 0.5
    assert one_off.metric("recall_accuracy") == 7 / 8

    both = one_off + perfect
    assert both.metric("passkey_accuracy") == 3 / 4
    assert EvalTotals.from_tensor(both.to_tensor()) == both
    assert both.to_tensor().dtype == torch.float64 and both.to_tensor().shape == (6,)


def test_metrics_formulas_and_unknown_metric():
    totals = EvalTotals(loss_sum=10 * math.log(2.0), tokens=4, bytes=5)
    assert totals.metric("bits_per_byte") == pytest.approx(2.0)
    assert totals.loss == pytest.approx(10 * math.log(2.0) / 4)
    with pytest.raises(ValueError, match="perplexity"):
        totals.metric("perplexity")
    task = build_task("mqar", 40, seed=0)
    with pytest.raises(ValueError, match="predictions"):
        task.eval_totals(task.batch([0]), torch.zeros(1, 39, dtype=torch.int64), torch.zeros(1, 40))


@pytest.mark.parametrize(
    "kind, seq_len, options, match",
    [
        ("bert", 64, {}, "kind='bert'.*passkey, mqar, text"),
        ("passkey", 64, {"keylen": 4}, "'keylen' is unknown; valid options: key_len"),
        ("passkey", 64, {"key_len": 0}, "key_len=0: must be an integer >= 1"),
        ("passkey", 64, {"key_len": "4"}, "key_len='4'"),
        ("passkey", 15, {"key_len": 4}, "seq_len=15: .*at least 16"),
        ("mqar", 64, {"num_pairs": 4, "num_queries": 5}, "num_queries=5: .*num_pairs=4"),
        ("mqar", 64, {"num_pairs": 40}, "num_pairs=40: .*key_vocab=32"),
        ("mqar", 20, {"num_pairs": 8}, "seq_len=20: .*at least 33"),
        ("mqar", 1, {}, "seq_len=1"),
        ("passkey", 64, {"pack": 3}, "pack=3: must divide seq_len=64"),
        ("passkey", 64, {"pack": 8}, "pack=8 needs at least 16 tokens per sample"),
        ("mqar", 64, {"pack": 0}, "pack=0: must be an integer >= 1"),
        ("passkey", 64, {"document_masks": "yes"}, "data.document_masks='yes': use true, false or null"),
        ("mqar", 64, {"restart_positions": 1}, "data.restart_positions=1"),
    ],
)
def test_bad_options_name_the_option_value_and_fix(kind, seq_len, options, match):
    with pytest.raises(ValueError, match=match):
        build_task(kind, seq_len, seed=0, **options)


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_packed_synthetic_samples_decode_to_their_parts(kind):
    # pack=4 at 64 tokens: each row is samples 4i..4i+3 of the unpacked task at 16 tokens, one document each.
    options = {"passkey": {"key_len": 2}, "mqar": {"num_pairs": 2, "num_queries": 2}}[kind]
    packed = build_task(kind, 64, seed=7, pack=4, **options)
    single = build_task(kind, 16, seed=7, **options)
    batch = packed.batch([0, 3], "valid")
    assert packed.document_masks and packed.restart_positions
    for row, index in enumerate((0, 3)):
        parts = single.batch(range(4 * index, 4 * index + 4), "valid")
        for name in ("tokens", "labels", "loss_mask", "positions"):
            torch.testing.assert_close(getattr(batch, name)[row].view(4, 16), getattr(parts, name), msg=name)
        torch.testing.assert_close(batch.document_ids[row], torch.arange(4).repeat_interleave(16))
    # Evaluation counts documents: one wrong answer spoils one of the eight, not its whole row.
    wrong = batch.labels.clone()
    wrong[1, batch.loss_mask[1].nonzero()[-1]] = 0
    totals = packed.eval_totals(batch, wrong, torch.zeros(2, 64))
    assert (totals.sequences, totals.correct_sequences) == (8, 7)
    # Masks off: one document per row, global positions, the same targets (samples never cross anyway).
    plain = build_task(kind, 64, seed=7, pack=4, document_masks=False, **options).batch([0, 3], "valid")
    assert not plain.document_ids.any()
    torch.testing.assert_close(plain.positions, torch.arange(64).expand(2, 64))
    torch.testing.assert_close(plain.loss_mask, batch.loss_mask)
    kept = build_task(kind, 64, seed=7, pack=4, restart_positions=False, **options).batch([0, 3], "valid")
    torch.testing.assert_close(kept.positions, plain.positions)
    torch.testing.assert_close(kept.document_ids, batch.document_ids)
    # The curriculum's shorter task keeps the document options.
    assert not build_task(kind, 64, seed=7, pack=4, document_masks=False, **options).batch_of_length(
        [0], 48).document_ids.any()


def test_bad_index_or_split():
    task = build_task("passkey", 32, seed=0)
    with pytest.raises(ValueError, match="split='test'"):
        task.sample(0, "test")
    with pytest.raises(ValueError, match="index=-1"):
        task.sample(-1)


# -- text ------------------------------------------------------------------------------------------------

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "over", "mat", "hill", "green", "blue", "old", "café",
         "naïve", "猫", "river", "stone"]


def _paragraphs(rng: random.Random, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "." for _ in range(count)]


def _write_jsonl(path, texts: list[str]) -> None:
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paragraphs = _paragraphs(random.Random(0), 80)
    (root / "text.txt").write_text("\n\n".join(paragraphs) + "\n  \n\n", encoding="utf-8")
    stats = prepare_text_dataset([str(root / "text.txt")], str(root / "bytes"))
    return root, paragraphs, stats


def test_prepare_writes_megatron_files_and_metadata(corpus):
    root, paragraphs, stats = corpus
    for suffix in (".bin", ".idx", ".json"):
        assert (root / f"bytes{suffix}").is_file()
    assert json.loads((root / "bytes.json").read_text()) == stats
    num_bytes = sum(len(p.encode("utf-8")) for p in paragraphs)
    assert stats["num_documents"] == len(paragraphs) and stats["num_bytes"] == num_bytes
    assert stats["num_tokens"] == num_bytes + len(paragraphs)
    ids = (stats["vocab_size"], stats["eod_id"], stats["pad_id"])
    assert stats["tokenizer"] == "byte" and ids == (258, 256, 257)
    assert stats["dtype"] == "uint16"


def test_indexed_dataset_reads_back_the_exact_ids(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, paragraphs, _ = corpus
    dataset = IndexedDataset(str(root / "bytes"))
    assert len(dataset) == len(paragraphs)
    for i in (0, 1, len(paragraphs) - 1):
        assert dataset[i].tolist() == list(paragraphs[i].encode("utf-8")) + [256]


def test_text_samples_are_real_next_token_pairs_and_deterministic(corpus, tmp_path):
    # The Megatron samples as they are: one document per sequence for attention, every position a target.
    root, paragraphs, stats = corpus
    task = build_task("text", 64, seed=1, path=str(root / "bytes"), document_masks=False)
    assert task.vocab_size == 258 and task.metric_name == "bits_per_byte"
    assert task.bytes_per_token == pytest.approx(stats["num_bytes"] / stats["num_tokens"])
    text = "\n".join(paragraphs).encode("utf-8")
    for index in range(5):
        s = task.sample(index)
        assert s["tokens"].shape == (64,) and s["tokens"].dtype == torch.int64
        assert s["loss_mask"].dtype == torch.bool
        torch.testing.assert_close(s["labels"][:-1], s["tokens"][1:])
        assert s["loss_mask"].all()
        pieces = bytes(t if t < 256 else 10 for t in s["tokens"].tolist()).split(b"\n")
        assert all(piece in text for piece in pieces)
    # A fresh cache directory rebuilds Megatron's indices from scratch: same samples.
    rebuilt = build_task("text", 64, seed=1, path=str(root / "bytes"), cache_dir=str(tmp_path / "cache"))
    reseeded = build_task("text", 64, seed=2, path=str(root / "bytes"), cache_dir=str(tmp_path / "cache"))
    train, valid = task.batch(range(4)), task.batch(range(4), "valid")
    torch.testing.assert_close(rebuilt.batch(range(4)).tokens, train.tokens)
    assert not torch.equal(reseeded.batch(range(4)).tokens, train.tokens)
    assert not torch.equal(valid.tokens, train.tokens)
    length = task.split_length("valid")
    torch.testing.assert_close(task.sample(length, "valid")["tokens"], task.sample(0, "valid")["tokens"])

    totals = task.eval_totals(train, train.labels, torch.full((4, 64), 0.5))
    assert totals.bytes == pytest.approx(4 * 64 * task.bytes_per_token)
    assert totals.metric("bits_per_byte") == pytest.approx(0.5 / math.log(2.0) / task.bytes_per_token)


def test_text_blend_needs_a_process_group(corpus):
    path = str(corpus[0] / "bytes")
    with pytest.raises(ValueError, match="blending several datasets needs an initialised process group"):
        build_task("text", 32, seed=0, path=[path, path])


def test_text_with_a_huggingface_tokenizer(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    paragraphs = _paragraphs(random.Random(2), 60)
    _write_jsonl(tmp_path / "docs.jsonl", paragraphs)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(paragraphs, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    stats = prepare_text_dataset([str(tmp_path / "docs.jsonl")], str(tmp_path / "bpe"),
                                 tokenizer=str(tmp_path / "tokenizer.json"))
    eod = tokenizer.token_to_id("<|endoftext|>")
    assert (stats["tokenizer"], stats["eod_id"], stats["pad_id"]) == ("huggingface", eod, -1)
    assert stats["vocab_size"] == tokenizer.get_vocab_size() and stats["num_documents"] == len(paragraphs)
    dataset = IndexedDataset(str(tmp_path / "bpe"))
    assert dataset[3].tolist() == tokenizer.encode(paragraphs[3], add_special_tokens=False).ids + [eod]
    assert stats["num_tokens"] < stats["num_bytes"]

    task = build_task("text", 32, seed=0, path=str(tmp_path / "bpe"))
    assert task.vocab_size == stats["vocab_size"]
    batch = task.batch(range(4))
    assert int(batch.tokens.max()) < task.vocab_size
    torch.testing.assert_close(batch.labels[:, :-1], batch.tokens[:, 1:])


def test_huggingface_tokenizer_without_eod_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "t.json"))
    (tmp_path / "a.txt").write_text("a b a\n\nb a", encoding="utf-8")
    with pytest.raises(ValueError, match="no end-of-document token.*eod_token="):
        prepare_text_dataset([str(tmp_path / "a.txt")], str(tmp_path / "out"),
                             tokenizer=str(tmp_path / "t.json"))
    stats = prepare_text_dataset([str(tmp_path / "a.txt")], str(tmp_path / "out"),
                                 tokenizer=str(tmp_path / "t.json"), eod_token="[UNK]")
    assert stats["eod_id"] == 2 and stats["num_tokens"] == 7


@pytest.mark.parametrize(
    "options, match",
    [
        ({"path": "nowhere/corpus"}, "corpus.bin is missing"),
        ({"path": ""}, "path=''"),
        ({"split": "100,0,0"}, "split='100,0,0'"),
        ({"split": "99.5,0.5"}, "valid split .* fewer than seq_len \\+ 1 = 65"),
        ({"weights": [1.0]}, "weights=\\[1.0\\]: weighted blends need num_samples"),
        ({"num_samples": 0}, "num_samples=0"),
        ({"seq": 3}, "'seq' is unknown"),
    ],
)
def test_text_bad_options(corpus, options, match):
    root = corpus[0]
    with pytest.raises(ValueError, match=match):
        build_task("text", 64, seed=0, **{"path": str(root / "bytes"), **options})


def _text_tokens_on_rank(prefixes: list[str], cache_dir: str) -> dict[str, torch.Tensor]:
    single = build_task("text", 64, seed=3, path=prefixes[0], cache_dir=cache_dir)
    blend = build_task("text", 32, seed=0, path=prefixes, cache_dir=cache_dir)
    weighted = build_task("text", 32, seed=0, path=prefixes, weights=[1, 3], num_samples=100,
                          num_valid_samples=10, cache_dir=cache_dir)
    return {
        "single": torch.stack([single.batch(range(6)).tokens, single.batch(range(6), "valid").tokens]),
        "blend": blend.batch(range(8)).tokens,
        "weighted": weighted.batch(range(8), "valid").tokens,
        "sizes": torch.tensor([weighted.split_length("train"), weighted.split_length("valid")]),
        "masked_bytes_per_token": torch.tensor([blend.bytes_per_token, weighted.bytes_per_token]).double(),
        "bytes_per_token": torch.tensor([_unmasked_bytes_per_token(t) for t in (blend, weighted)]).double(),
    }


def _unmasked_bytes_per_token(task) -> float:
    task.set_documents(masks=False)
    return task.bytes_per_token


def test_text_task_under_a_gloo_process_group(corpus, tmp_path):
    # Rank 0 builds Megatron's index cache while rank 1 waits at a barrier, then loads it.
    root, _, first = corpus
    _write_jsonl(tmp_path / "more.jsonl", _paragraphs(random.Random(1), 60))
    second = prepare_text_dataset([str(tmp_path / "more.jsonl")], str(tmp_path / "more"))
    assert second["num_documents"] == 60
    prefixes = [str(root / "bytes"), str(tmp_path / "more")]

    results = run_ranks(_text_tokens_on_rank, 2, prefixes, str(tmp_path / "cache"))
    for key, value in results[0].items():
        torch.testing.assert_close(value, results[1][key])
    single = build_task("text", 64, seed=3, path=prefixes[0], cache_dir=str(tmp_path / "local_cache"))
    torch.testing.assert_close(results[0]["single"][0], single.batch(range(6)).tokens)
    # A weighted blend rounds each dataset's share up: ceil(0.25 * 10) + ceil(0.75 * 10) valid samples.
    assert results[0]["sizes"].tolist() == [100, 11]
    ratio = [s["num_bytes"] / s["num_tokens"] for s in (first, second)]
    by_size = (first["num_bytes"] + second["num_bytes"]) / (first["num_tokens"] + second["num_tokens"])
    torch.testing.assert_close(results[0]["bytes_per_token"],
                               torch.tensor([by_size, (ratio[0] + 3 * ratio[1]) / 4], dtype=torch.float64))
    # With document masks each document's EOD target is dropped: the byte tokenizer's targets are its bytes.
    torch.testing.assert_close(results[0]["masked_bytes_per_token"], torch.ones(2, dtype=torch.float64))


def test_tasks_tuple():
    assert TASKS == ("passkey", "mqar", "text")
    assert tuple(TASK_TYPES) == TASKS  # the registry builds every task the config accepts, and no other


@pytest.mark.parametrize("kind", ["passkey", "mqar"])
def test_synthetic_curriculum_batches_are_generated_at_the_shorter_length(kind):
    task = build_task(kind, 64, seed=7, **SYNTHETIC[kind])
    short = task.batch_of_length(range(3), 48)
    expected = build_task(kind, 48, seed=7, **SYNTHETIC[kind]).batch(range(3))
    for name in ("tokens", "labels", "loss_mask", "positions"):
        torch.testing.assert_close(getattr(short, name), getattr(expected, name))
    torch.testing.assert_close(task.batch_of_length(range(3), 64).tokens, task.batch(range(3)).tokens)


def test_text_curriculum_batches_are_truncated(corpus):
    root, _, _ = corpus
    task = build_task("text", 64, seed=1, path=str(root / "bytes"))
    full, short = task.batch(range(3)), task.batch_of_length(range(3), 16)
    for name in ("tokens", "labels", "loss_mask", "positions"):
        torch.testing.assert_close(getattr(short, name), getattr(full, name)[:, :16])


def test_text_documents_end_at_eod(corpus):
    # Document ids count the EODs before each token (EOD ends its own document); positions restart after each;
    # EOD's target, the next document's first token, is not trained.
    root, _, stats = corpus
    masked = build_task("text", 64, seed=1, path=str(root / "bytes"))
    plain = build_task("text", 64, seed=1, path=str(root / "bytes"), document_masks=False)
    restarted = build_task("text", 64, seed=1, path=str(root / "bytes"), document_masks=False,
                           restart_positions=True)
    batch, old, moved = masked.batch(range(8)), plain.batch(range(8)), restarted.batch(range(8))
    eod = batch.tokens == stats["eod_id"]
    assert eod.any(dim=1).sum() >= 4  # rows with and without a document boundary
    torch.testing.assert_close(batch.document_ids, eod.long().cumsum(1) - eod.long())
    torch.testing.assert_close(batch.loss_mask, ~eod)
    for b in range(8):
        starts = [0, *(eod[b].nonzero().flatten() + 1).tolist(), 64]
        expected = torch.cat([torch.arange(end - start) for start, end in itertools.pairwise(starts) if end > start])
        torch.testing.assert_close(batch.positions[b], expected)
    torch.testing.assert_close(moved.positions, batch.positions)
    assert not old.document_ids.any() and not moved.document_ids.any() and old.loss_mask.all()
    torch.testing.assert_close(old.positions, torch.arange(64).expand(8, 64))
    # The byte tokenizer: with EOD's target dropped, every target stands for exactly one byte.
    assert masked.bytes_per_token == pytest.approx(1.0)
    assert plain.bytes_per_token == pytest.approx(stats["num_bytes"] / stats["num_tokens"])

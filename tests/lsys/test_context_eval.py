"""`lsys eval --out`: the needle placed where asked, the needle grid of a trained model (cells that add up, the
heatmap, ring 2 equal to one rank, lengths beyond the trained one), and loss by position against direct sums."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lsys.context_eval import bucket_edges, position_sums
from lsys.data import build_task, prepare_text_dataset
from lsys.data.passkey import KEY, QUERY
from tests.commands import TINY, lsys

FLOAT64 = ["train.param_dtype=float64", "train.compute_dtype=float64"]


def test_passkey_depth_moves_only_the_key_block():
    shallow, deep = (build_task("passkey", 64, 7, depth=d).batch([0, 1], "valid") for d in (0.0, 1.0))
    for a, b in zip(shallow.tokens, deep.tokens, strict=True):
        assert a[1] == KEY and b[-11] == KEY and b[-6] == QUERY  # right after BOS; right before QUERY
        assert torch.equal(a[-5:], b[-5:])  # the same key asked
        assert torch.equal(torch.sort(a).values, torch.sort(b).values)  # the same filler, moved
    with pytest.raises(ValueError, match="depth=1.5"):
        build_task("passkey", 64, 7, depth=1.5)


def test_position_buckets_equal_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.arange(50), torch.arange(50) % 17])  # one plain row, one packed row
    losses = torch.rand(2, 50, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 50, generator=gen) > 0.3
    edges = bucket_edges(50, 7)
    sums = position_sums(positions, losses, mask, edges)
    for k in range(7):
        inside = mask & (positions >= edges[k]) & (positions < edges[k + 1])
        assert sums[1, k].item() == inside.sum().item()
        assert sums[0, k].item() == pytest.approx(losses[inside].sum().item(), rel=1e-12)
    assert sums[1].sum().item() == mask.sum().item()


def _needle(tmp_path, name, *args):
    result = lsys("eval", str(tmp_path / "run"), "--out", str(tmp_path / name), "--lengths", "16,32,64",
                  "--depths", "0,0.5,1", "--samples", "6", *args)
    assert result.returncode == 0, result.stderr
    assert "did the context help?" in result.stderr and "Traceback" not in result.stderr
    return json.loads((tmp_path / name / "needle.json").read_text())


@pytest.mark.slow
def test_needle_grid_adds_up_and_ring_2_equals_one_rank(tmp_path):
    trained = lsys("train", "configs/demo.yaml", *TINY, *FLOAT64, "parallel.dp=1", "parallel.cp_ring=1",
                   f"train.run_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr
    one = _needle(tmp_path, "one", "parallel.dp=1", "parallel.cp_ring=1")
    ring = _needle(tmp_path, "ring", "--nproc", "2", "parallel.dp=1", "parallel.cp_ring=2")
    assert one["shape"] == [3, 3] and one["lengths"] == [16, 32, 64] and one["depths"] == [0.0, 0.5, 1.0]
    (run,) = one["runs"]
    assert run["step"] == 4 and len(run["accuracy"]) == 3 and all(len(row) == 3 for row in run["accuracy"])
    for correct, sequences, accuracy in zip(*(sum(run[k], []) for k in ("correct", "sequences", "accuracy")),
                                            strict=True):
        assert sequences == 6 and 0 <= correct <= sequences and accuracy == correct / sequences
    assert (tmp_path / "one" / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "one" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("eval/needle")] == [4]  # the heatmap, at the evaluated step
    # 64 tokens (twice the trained length) split over the ring: the same answers and losses as on one rank.
    (ring_run,) = ring["runs"]
    assert ring_run["layout"]["cp"] == 2 and ring_run["correct"] == run["correct"]
    for got, want in zip(sum(ring_run["loss"], []), sum(run["loss"], []), strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "the cat sat on the mat. " * 30}) + "\n"
                              for i in range(40)))
    prepare_text_dataset([str(corpus)], str(root / "corpus"))
    run = root / "run"
    trained = lsys("train", "configs/demo.yaml", *TINY, *FLOAT64, "parallel.dp=1", "parallel.cp_ring=1",
                   "data.task=text", f"data.text.path={root / 'corpus'}", "data.seq_len=64", f"train.run_dir={run}")
    assert trained.returncode == 0, trained.stderr
    return run


def test_a_text_needle_longer_than_the_length_is_refused_before_any_rank(text_run, tmp_path):
    # The byte tokenizer: " The pass key is" twice, " Remember it.", the question, " NNNNN." twice: 81 tokens.
    task = build_task("text", 64, 0, path=str(text_run.parent / "corpus"))
    assert type(task).needle_tokens({"path": str(text_run.parent / "corpus")}) == 81
    assert task.needle_task(82, 0.5).sample(0)["tokens"].shape == (82,)
    with pytest.raises(ValueError, match="take 81 tokens"):
        task.needle_task(81, 0.5).sample(0)
    result = lsys("eval", str(text_run), "--out", str(tmp_path / "out"), "--lengths", "64,80,128")
    assert result.returncode == 2
    assert "--lengths: 64, 80: the needle sentence, question and answer take up to 81 tokens" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_text_needle_and_position_loss_add_up_to_the_held_out_loss(text_run, tmp_path):
    out = tmp_path / "out"
    result = lsys("eval", str(text_run), str(text_run), "--out", str(out), "--lengths", "128", "--depths", "0.5",
                  "--samples", "4", "--buckets", "4")
    assert result.returncode == 0, result.stderr
    needle = json.loads((out / "needle.json").read_text())
    assert needle["shape"] == [1, 1] and needle["runs"][0]["sequences"] == [[4.0]]
    position = json.loads((out / "position_loss.json").read_text())
    assert len(position["runs"]) == 2 and (out / "position_loss.png").exists()  # both TARGETs drawn
    buckets = position["runs"][0]
    assert buckets["edges"] == [0, 16, 32, 48, 64]
    assert [buckets[k] for k in ("loss", "tokens")] == [position["runs"][1][k] for k in ("loss", "tokens")]
    # The token-weighted mean of the buckets is the held-out loss `lsys eval` reports over the same sequences.
    held_out = lsys("eval", str(text_run), "train.eval_samples=4")
    assert held_out.returncode == 0, held_out.stderr
    loss = json.loads(held_out.stdout.strip().splitlines()[-1])["loss"]
    mean = sum(x * n for x, n in zip(buckets["loss"], buckets["tokens"], strict=True)) / sum(buckets["tokens"])
    assert mean == pytest.approx(loss, rel=1e-9)
    assert all(math.isfinite(b) for b in buckets["bits_per_byte"])


@pytest.mark.slow
def test_recall_by_pairs_of_a_run_and_of_its_huggingface_export_agree(tmp_path):
    mqar = ["data.task=mqar", "data.seq_len=64", "data.mqar.num_pairs=4", "data.mqar.num_queries=4"]
    trained = lsys("train", "configs/demo.yaml", *TINY, *mqar, "parallel.dp=1", "parallel.cp_ring=1",
                   f"train.run_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr
    exported = lsys("export", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    recalls = []
    for target, extra in ((tmp_path / "run", []), (tmp_path / "hf", mqar)):
        out = tmp_path / f"out-{target.name}"
        result = lsys("eval", str(target), *extra, "parallel.dp=1", "parallel.cp_ring=1", "--out", str(out),
                      "--samples", "8")
        assert result.returncode == 0, result.stderr
        (run,) = json.loads((out / "recall.json").read_text())["runs"]
        assert run["pairs"] == [1, 2, 4, 8] and all(0.0 <= r <= 1.0 for r in run["recall_accuracy"])
        assert (out / "recall.png").exists() and not (out / "needle.json").exists()  # mqar has no needle
        recalls.append(run["recall_accuracy"])
    assert recalls[0] == pytest.approx(recalls[1], abs=1e-12)  # the same weights, read from either

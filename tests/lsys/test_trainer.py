"""The trainer end to end on gloo ranks: parallel layouts against one rank, exact resume, failures.

Runs use float64 parameters and compute so that "equal" means equal up to summation order.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import torch
import torch.distributed as dist

from launch.local import RankFailedError
from lsys.config import LsysConfig
from lsys.metrics import read_metrics
from lsys.trainer import learning_rate, sequence_length, train_from_dict
from tests.distributed import run_ranks
from tests.lsys.harness import assert_same_training, losses_and_grads, tiny_config


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict[str, Any]:
    """The single-process reference: 1 rank with the whole global batch."""
    return run_ranks(losses_and_grads, 1, tiny_config(tmp_path_factory.mktemp("ref")))[0]


@pytest.mark.parametrize("overrides", [
    ("parallel.dp=2",),
    ("parallel.cp_ring=2", "parallel.cp_layout=zigzag"),
    ("parallel.cp_ring=2", "parallel.cp_layout=contiguous"),
    ("parallel.cp_ulysses=2",),
    ("parallel.cp_ring=2", "recompute.mode=selective"),
    ("parallel.cp_ring=2", "recompute.mode=full"),
    ("parallel.cp_ulysses=2", "recompute.mode=selective", "train.micro_batch_size=2"),
    ("parallel.dp=2", "recompute.mode=full", "recompute.every=2"),
    ("parallel.tp=2",),
    ("parallel.tp=2", "recompute.mode=selective", "train.micro_batch_size=2"),
    ("parallel.cp_ring=2", "train.loss_chunk_tokens=3"),
    ("parallel.dp=2", "recompute.mode=full", "train.loss_chunk_tokens=5"),
], ids=["dp2", "ring2-zigzag", "ring2-contiguous", "ulysses2", "ring2-selective", "ring2-full",
        "ulysses2-selective-micro", "dp2-full-every2", "tp2", "tp2-selective-micro", "ring2-chunked-loss",
        "dp2-full-chunked-loss"])
def test_two_ranks_train_exactly_like_one(tmp_path, one_rank, overrides):
    results = run_ranks(losses_and_grads, 2, tiny_config(tmp_path, *overrides))
    for result in results:
        assert_same_training(result, one_rank)


def _each_config(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Several layouts of one world size in one spawn: far cheaper than a spawn per layout.
    return [losses_and_grads(values, evaluate=True) for values in configs]


# Two passkey samples of 16 tokens per sequence: document masks and restarted positions are on.
PACKED = ("data.passkey.pack=2",)


def test_packed_documents_train_exactly_like_one_rank(tmp_path):
    unmasked = tiny_config(tmp_path / "off", *PACKED, "data.document_masks=false")
    reference, unmasked = run_ranks(_each_config, 1, [tiny_config(tmp_path / "one", *PACKED), unmasked])[0]
    assert reference["losses"] != unmasked["losses"]  # the masks change what is computed
    layouts = [("parallel.dp=2",), ("parallel.tp=2",), ("parallel.cp_ring=2",), ("parallel.cp_ulysses=2",),
               ("parallel.cp_ring=2", "recompute.mode=selective"),
               ("parallel.cp_ring=2", "parallel.cp_layout=balanced", "recompute.mode=full")]
    configs = [tiny_config(tmp_path / "-".join(layout), *PACKED, *layout) for layout in layouts]
    # The balanced layout without masks: every row one document, balanced like plain causal attention.
    configs.append(tiny_config(tmp_path / "balanced-off", *PACKED, "data.document_masks=false",
                               "parallel.cp_ring=2", "parallel.cp_layout=balanced"))
    for per_rank in run_ranks(_each_config, 2, configs):
        for result, expected in zip(per_rank, [reference] * len(layouts) + [unmasked], strict=True):
            assert_same_training(result, expected)
            # Evaluation gathers per-token predictions and losses back to the original order.
            assert result["eval"] == pytest.approx(expected["eval"], rel=1e-9)


@pytest.mark.parametrize("overrides", [
    ("parallel.cp_ring=2", "quant.activations=int8"),
    ("parallel.cp_ulysses=2", "quant.activations=int8", "recompute.mode=selective"),
    ("parallel.cp_ring=2", "quant.activations=int8", "recompute.mode=selective"),
    ("parallel.cp_ring=2", "quant.activations=int8", "recompute.mode=full"),
    ("parallel.tp=2", "quant.activations=int8"),
    ("parallel.tp=2", "quant.activations=int8", "recompute.mode=selective"),
], ids=["ring2-int8", "ulysses2-int8-selective", "ring2-int8-selective", "ring2-int8-full", "tp2-int8",
        "tp2-int8-selective"])
def test_int8_activations_keep_the_forward_exact_and_gradients_close(tmp_path, one_rank, overrides):
    result = run_ranks(losses_and_grads, 2, tiny_config(tmp_path, *overrides))[0]
    torch.testing.assert_close(result["losses"][0], one_rank["losses"][0], rtol=1e-10, atol=0)
    got, want = torch.cat([g.flatten() for g in result["grads"][0]]), torch.cat([g.flatten() for g in
                                                                               one_rank["grads"][0]])
    assert ((got - want).norm() / want.norm()).item() < 5e-2


OFFLOAD = ("recompute.offload=cpu",)


def test_offloaded_activations_train_exactly_like_one_rank(tmp_path, one_rank):
    """What recomputation keeps goes to host memory and comes back (recompute.offload): nothing changes."""
    two = [("parallel.cp_ring=2", "recompute.mode=full"), ("parallel.cp_ulysses=2", "recompute.mode=selective"),
           ("parallel.tp=2", "recompute.mode=selective"), ("parallel.dp=2", "recompute.mode=full"),
           ("parallel.cp_ring=2", "recompute.mode=selective", "model.mlp_chunk_tokens=5")]
    int8 = ("parallel.cp_ring=2", "recompute.mode=selective", "quant.activations=int8")
    configs = [tiny_config(tmp_path / "-".join(o), *o, *OFFLOAD) for o in two]
    configs += [tiny_config(tmp_path / "int8", *int8), tiny_config(tmp_path / "int8-offload", *int8, *OFFLOAD)]
    for *exact, quantized, quantized_offloaded in run_ranks(_each_config, 2, configs):
        for result in exact:
            assert_same_training(result, one_rank)
        # int8 payloads move as they are: the same rounding, the same training, offloaded or not.
        assert quantized_offloaded["losses"] == quantized["losses"]
        for got, want in zip(quantized_offloaded["grads"], quantized["grads"], strict=True):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    four = [("parallel.cp_ring=2", "parallel.cp_ulysses=2", "recompute.mode=selective"),
            ("parallel.dp=2", "parallel.tp=2", "recompute.mode=full", "recompute.every=2")]
    configs = [tiny_config(tmp_path / "-".join(o), *o, *OFFLOAD) for o in four]
    for per_rank in run_ranks(_each_config, 4, configs):
        for result in per_rank:
            assert_same_training(result, one_rank)


def test_state_offloaded_to_the_host_trains_exactly_like_one_rank(tmp_path, one_rank):
    """parallel.fsdp_offload: parameters and gradients in host memory (FSDP2 applied on one rank too)."""
    one = run_ranks(_each_config, 1, [tiny_config(tmp_path / "one", "parallel.fsdp_offload=cpu")])[0]
    two = [("parallel.dp=2",), ("parallel.cp_ring=2", "recompute.mode=full", *OFFLOAD)]
    configs = [tiny_config(tmp_path / "-".join(o), *o, "parallel.fsdp_offload=cpu") for o in two]
    for result in one + [r for per_rank in run_ranks(_each_config, 2, configs) for r in per_rank]:
        assert_same_training(result, one_rank)


def test_micro_batches_accumulate_to_the_full_batch(tmp_path, one_rank):
    result = run_ranks(losses_and_grads, 1, tiny_config(tmp_path, "train.micro_batch_size=1"))[0]
    assert_same_training(result, one_rank)


def test_stopped_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    # float32: the default dtype, compared bit for bit.
    common = ("train.steps=6", "train.param_dtype=float32", "train.compute_dtype=float32", "checkpoint.every=2")
    straight = run_ranks(train_from_dict, 2, tiny_config(tmp_path / "straight", *common))[0]
    stopped = run_ranks(train_from_dict, 2, tiny_config(tmp_path / "resumed", *common, "train.exit_at_step=3"))[0]
    resumed = run_ranks(train_from_dict, 2, tiny_config(tmp_path / "resumed", *common))[0]
    assert (stopped["start_step"], stopped["end_step"], resumed["start_step"]) == (0, 3, 3)
    assert stopped["losses"] + resumed["losses"] == straight["losses"]
    assert resumed["evals"] == straight["evals"]
    # A crash after step 6 whose newest complete checkpoint is step 4: steps 5 and 6 are trained and logged
    # again, and the metrics keep each step once.
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000006")
    again = run_ranks(train_from_dict, 2, tiny_config(tmp_path / "resumed", *common))[0]
    assert again["start_step"] == 4 and again["losses"] == straight["losses"][4:]
    logged = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r and "split" not in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == straight["losses"]
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000006"]  # keep_last=2, no .tmp left behind
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert meta["step"] == 6 and meta["layout"]["world_size"] == 2


def test_checkpoint_from_two_ranks_resumes_on_one(tmp_path):
    # Replicated parameters and optimizer state: the data-parallel degree may change across a restart.
    two_ranks = tiny_config(tmp_path, "train.steps=4", "checkpoint.every=2", "parallel.dp=2")
    straight = run_ranks(train_from_dict, 2, two_ranks)[0]
    run_ranks(train_from_dict, 2, {**two_ranks, "train": {**two_ranks["train"], "exit_at_step": 2,
                                                          "run_dir": str(tmp_path / "moved")}})
    one_rank = tiny_config(tmp_path / "moved", "train.steps=4", "checkpoint.every=2")
    resumed = run_ranks(train_from_dict, 1, one_rank)[0]
    assert resumed["start_step"] == 2
    torch.testing.assert_close(resumed["losses"], straight["losses"][2:], rtol=1e-10, atol=0)


def test_resume_ignores_an_incomplete_checkpoint(tmp_path):
    values = tiny_config(tmp_path, "train.steps=2")
    run_ranks(train_from_dict, 1, values)
    # A save killed mid-write leaves step_N.tmp: it must neither be loaded nor break the run.
    (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir()
    values["train"]["steps"] = 4
    summary = run_ranks(train_from_dict, 1, values)[0]
    assert summary["start_step"] == 2 and summary["end_step"] == 4


def _train_with_bad_vocab_on_rank_one(values: dict[str, Any]) -> Any:
    if dist.get_rank() == 1:
        values["model"]["vocab_size"] = 5
    return train_from_dict(values)


def test_one_failing_rank_ends_the_job_with_its_traceback(tmp_path):
    # Rank 0 is left waiting in a collective; the launcher must stop it and report rank 1's error.
    with pytest.raises(RankFailedError, match=r"model.vocab_size=5 is smaller") as info:
        run_ranks(_train_with_bad_vocab_on_rank_one, 2, tiny_config(tmp_path, "parallel.dp=2"), timeout_s=120)
    assert info.value.rank == 1 and "Traceback" in info.value.detail


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = LsysConfig()
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.lr, cfg.train.min_lr = 110, 10, 1.0, 0.1
    lrs = [learning_rate(cfg, step) for step in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * 99 / 100)).item()))


def test_sequence_curriculum_grows_geometrically_in_allowed_multiples():
    cfg = LsysConfig()
    cfg.data.seq_len, cfg.data.curriculum.start_len, cfg.data.curriculum.steps = 512, 32, 100
    lengths = [sequence_length(cfg, step, granularity=8) for step in range(120)]
    assert lengths[0] == 32 and lengths[50] == 128 and lengths[99] < 512 and lengths[100:] == [512] * 20
    assert all(length % 8 == 0 for length in lengths) and lengths == sorted(lengths)
    cfg.data.curriculum.start_len = 0
    assert sequence_length(cfg, 0, granularity=8) == 512

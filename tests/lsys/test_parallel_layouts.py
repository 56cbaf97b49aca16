"""Every pair of parallel axes at size 2 (4 ranks) and dp x cp x tp = 2 x 2 x 2 (8 ranks) train like one rank.

Each layout runs the same global batch as the single-rank reference: exact (float64, equal up to summation
order) without savers and with recomputation; with selective recomputation plus int8 stored activations the
forward stays exact and the gradients are close (int8 storage error). A Qwen-style model (biases, per-head
q/k norms, YaRN) does the same on each axis alone (2 ranks).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lsys.trainer import train_from_dict
from tests.distributed import run_ranks
from tests.lsys.harness import assert_same_training, losses_and_grads, tiny_config

PAIRS = {
    "dp2-ring2": ("parallel.dp=2", "parallel.cp_ring=2"),
    "dp2-ulysses2": ("parallel.dp=2", "parallel.cp_ulysses=2"),
    "dp2-tp2": ("parallel.dp=2", "parallel.tp=2"),
    "ring2-ulysses2": ("parallel.cp_ring=2", "parallel.cp_ulysses=2"),
    "ring2-tp2": ("parallel.cp_ring=2", "parallel.tp=2"),
    "ulysses2-tp2": ("parallel.cp_ulysses=2", "parallel.tp=2"),
}
SAVERS = {
    "exact": (),
    "selective": ("recompute.mode=selective",),
    "full": ("recompute.mode=full",),
}
THREE_AXES = ("parallel.dp=2", "parallel.cp_ring=2", "parallel.tp=2")
INT8 = ("recompute.mode=selective", "quant.activations=int8")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict[str, Any]:
    return run_ranks(losses_and_grads, 1, tiny_config(tmp_path_factory.mktemp("ref")))[0]


def _assert_int8_close(result: dict[str, Any], reference: dict[str, Any]) -> None:
    torch.testing.assert_close(result["losses"][0], reference["losses"][0], rtol=1e-10, atol=0)
    got = torch.cat([g.flatten() for g in result["grads"][0]])
    want = torch.cat([g.flatten() for g in reference["grads"][0]])
    assert ((got - want).norm() / want.norm()).item() < 5e-2


# Without savers only the 2-D context group is in the default run: each pair's selective case trains the same
# layout (recomputing part of it), so the others are exhaustive variants.
TWO_AXES_CASES = [
    pytest.param(pair, savers, id=f"{pair}-{savers}",
                 marks=[pytest.mark.exhaustive] if savers == "exact" and pair != "ring2-ulysses2" else [])
    for savers in ("exact", "selective") for pair in PAIRS
]


@pytest.mark.parametrize(("pair", "savers"), TWO_AXES_CASES)
def test_two_axes_train_exactly_like_one_rank(tmp_path, one_rank, pair, savers):
    results = run_ranks(losses_and_grads, 4, tiny_config(tmp_path, *PAIRS[pair], *SAVERS[savers]))
    for result in results:
        assert_same_training(result, one_rank)


# The data axis only splits the batch, which int8 storage never sees: its pairs are exhaustive variants.
@pytest.mark.parametrize("pair", [
    pytest.param(pair, marks=[pytest.mark.exhaustive] if pair.startswith("dp2-") else []) for pair in PAIRS])
def test_two_axes_with_int8_activations(tmp_path, one_rank, pair):
    result = run_ranks(losses_and_grads, 4, tiny_config(tmp_path, *PAIRS[pair], *INT8))[0]
    _assert_int8_close(result, one_rank)


@pytest.mark.parametrize("savers", [pytest.param("exact", marks=pytest.mark.exhaustive), "full"])  # full: same layout
def test_three_axes_train_exactly_like_one_rank(tmp_path, one_rank, savers):
    results = run_ranks(losses_and_grads, 8, tiny_config(tmp_path, *THREE_AXES, *SAVERS[savers]), timeout_s=300)
    for result in results:
        assert_same_training(result, one_rank)


def test_three_axes_with_int8_activations(tmp_path, one_rank):
    result = run_ranks(losses_and_grads, 8, tiny_config(tmp_path, *THREE_AXES, *INT8), timeout_s=300)[0]
    _assert_int8_close(result, one_rank)


RESHARDS = {
    "dp2-ring2-to-ring4": (("parallel.dp=2", "parallel.cp_ring=2"), ("parallel.dp=1", "parallel.cp_ring=4")),
    "dp2-tp2-to-ulysses2-tp2": (("parallel.dp=2", "parallel.tp=2"), ("parallel.cp_ulysses=2", "parallel.tp=2")),
}


# Both go through the same DCP resharding; the tensor-parallel one also moves DTensor shards between meshes.
@pytest.mark.parametrize("reshard", [
    pytest.param(name, marks=[pytest.mark.exhaustive] if name == "dp2-ring2-to-ring4" else []) for name in RESHARDS])
def test_checkpoint_saved_in_one_layout_resumes_in_another(tmp_path, reshard):
    saved_layout, loaded_layout = RESHARDS[reshard]
    common = ("train.steps=4", "checkpoint.every=2")
    straight = run_ranks(train_from_dict, 4, tiny_config(tmp_path / "straight", *common, *saved_layout))[0]
    stopped = run_ranks(train_from_dict, 4, tiny_config(tmp_path / "run", *common, *saved_layout,
                                                        "train.exit_at_step=2"))[0]
    resumed = run_ranks(train_from_dict, 4, tiny_config(tmp_path / "run", *common, *loaded_layout))[0]
    assert (stopped["end_step"], resumed["start_step"]) == (2, 2)
    # Parameters and AdamW state come back resharded through torch.distributed.checkpoint: the resumed steps
    # repeat the uninterrupted run's losses (float64: equal up to summation order).
    torch.testing.assert_close(resumed["losses"], straight["losses"][2:], rtol=1e-10, atol=0)


def _local_state_numel(values: dict[str, Any]) -> dict[str, int]:
    from lsys.config import config_from_dict
    from lsys.model import count_parameters
    from lsys.session import distributed_session
    from lsys.trainer import Trainer

    cfg = config_from_dict(values)
    with distributed_session("cpu", 60.0) as session:
        trainer = Trainer(cfg, session)
        trainer.train_step(0)
        local = sum(p.to_local().numel() for p in trainer.model.parameters())
        moments = sum(state["exp_avg"].to_local().numel() for state in trainer.optimizer.state.values())
        total = count_parameters(trainer.model)
    return {"local": local, "moments": moments, "total": total}


@pytest.mark.parametrize(("layout", "shards"), [
    (("parallel.dp=2", "parallel.cp_ring=2"), 4),
    (("parallel.dp=2", "parallel.tp=2"), 4),
])
def test_parameters_and_optimizer_state_are_sharded_over_every_rank(tmp_path, layout, shards):
    # FSDP2 shards over the replica axis (dp x cp), tensor parallelism over tp: each rank keeps about
    # 1/shards of the parameters and of AdamW's moments (dim-0 shards are padded to equal sizes).
    for result in run_ranks(_local_state_numel, 4, tiny_config(tmp_path, *layout)):
        assert result["local"] == result["moments"]
        assert result["total"] / shards <= result["local"] <= 1.2 * result["total"] / shards


# A Qwen-style model: q/k/v biases, per-head q/k norms (Split.HEADS under tensor parallelism, kept projections
# under selective recompute), head_dim apart from hidden / heads, YaRN-scaled RoPE.
QWEN = ("model.qk_norm=true", "model.attention_bias=true", "model.head_dim=12", "model.rope_scaling.rope_type=yarn",
        "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=16")
QWEN_LAYOUTS = {
    "ring2": ("parallel.cp_ring=2",),
    "ulysses2": ("parallel.cp_ulysses=2",),
    "tp2": ("parallel.tp=2",),
    "dp2": ("parallel.dp=2",),
    "tp2-selective": ("parallel.tp=2", "recompute.mode=selective"),
}


@pytest.fixture(scope="module")
def one_rank_qwen(tmp_path_factory) -> dict[str, Any]:
    return run_ranks(losses_and_grads, 1, tiny_config(tmp_path_factory.mktemp("ref-qwen"), *QWEN))[0]


@pytest.mark.parametrize("layout", [  # tp2-selective trains the tp2 layout too
    pytest.param(name, marks=[pytest.mark.exhaustive] if name == "tp2" else []) for name in QWEN_LAYOUTS])
def test_qwen_style_model_trains_exactly_like_one_rank(tmp_path, one_rank_qwen, layout):
    for result in run_ranks(losses_and_grads, 2, tiny_config(tmp_path, *QWEN, *QWEN_LAYOUTS[layout])):
        assert_same_training(result, one_rank_qwen)


def test_qwen_style_model_with_int8_activations(tmp_path, one_rank_qwen):
    result = run_ranks(losses_and_grads, 2, tiny_config(tmp_path, *QWEN, "parallel.tp=2", *INT8))[0]
    _assert_int8_close(result, one_rank_qwen)


@pytest.mark.slow
def test_tied_embeddings_train_exactly_like_one_rank(tmp_path):
    # One parameter shared by the embedding and the output head, sharded once by FSDP2.
    tied = ("model.tie_embeddings=true",)
    reference = run_ranks(losses_and_grads, 1, tiny_config(tmp_path / "ref", *tied))[0]
    for result in run_ranks(losses_and_grads, 2, tiny_config(tmp_path / "dp2", *tied, "parallel.dp=2")):
        assert_same_training(result, reference)

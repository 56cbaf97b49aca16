"""FSDP2 units of several blocks (parallel.fsdp_unit_params) train exactly like one rank, and AdamW's foreach path
(what lsys.optim builds) makes the same update as its per-parameter loop."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks
from tests.lsys.harness import assert_same_training, losses_and_grads, tiny_config

# The tiny model's blocks hold about 9.3K parameters each: 10K groups both into one unit, 10**9 leaves them with
# the root.
TWO_BLOCKS, ROOT_ONLY = "parallel.fsdp_unit_params=10000", "parallel.fsdp_unit_params=1000000000"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run_ranks(losses_and_grads, 1, tiny_config(tmp_path_factory.mktemp("ref")))[0]


@pytest.mark.parametrize("overrides", [
    (TWO_BLOCKS, "parallel.dp=2", "parallel.cp_ring=2"),
    (ROOT_ONLY, "parallel.dp=2", "parallel.cp_ring=2", "recompute.mode=full"),
    (TWO_BLOCKS, "parallel.dp=2", "parallel.tp=2", "recompute.mode=full"),
    (ROOT_ONLY, "parallel.dp=2", "parallel.tp=2"),
], ids=["two-blocks-dp2-ring2", "root-only-dp2-ring2-full", "two-blocks-dp2-tp2-full", "root-only-dp2-tp2"])
def test_fsdp_units_train_exactly_like_one_rank(tmp_path, one_rank, overrides):
    for result in run_ranks(losses_and_grads, 4, tiny_config(tmp_path, *overrides)):
        assert_same_training(result, one_rank)


def _per_parameter_adamw(values):
    import lsys.optim

    class LoopAdamW(lsys.optim.LocalAdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "foreach": False})  # over build_optimizer's foreach=True

    lsys.optim.LocalAdamW = LoopAdamW  # in this rank's process only
    return losses_and_grads(values)


def test_foreach_adamw_is_bit_identical_to_the_per_parameter_loop_on_sharded_parameters(tmp_path):
    values = tiny_config(tmp_path, "parallel.dp=2", "train.steps=4")
    for foreach, loop in zip(run_ranks(losses_and_grads, 2, values), run_ranks(_per_parameter_adamw, 2, values),
                             strict=True):
        assert foreach["losses"] == loop["losses"]
        for a, b in zip(foreach["grads"], loop["grads"], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _bf16_training(values, policy):
    """Losses of a bf16-compute run over fp32 parameters, with FSDP2's mixed-precision policy or (`policy` False)
    without it, and the dtype of a block's parameters as its forward sees them."""
    import parallel.parallelize
    from lsys.config import config_from_dict
    from lsys.session import distributed_session
    from lsys.trainer import Trainer

    if not policy:  # in this rank's process only
        shard = parallel.parallelize.shard_data_parallel
        parallel.parallelize.shard_data_parallel = lambda *args: shard(*args[:5])
    cfg = config_from_dict(values)
    with distributed_session("cpu", 60.0) as session:
        trainer = Trainer(cfg, session)
        seen = []
        block = trainer.model.parallel_plan().blocks[0].block
        block.register_forward_pre_hook(lambda module, _: seen.append(next(module.parameters()).dtype))
        losses = [trainer.train_step(step)["loss"] for step in range(cfg.train.steps)]
        state_dtypes = {p.dtype for p in trainer.model.parameters()}
    return {"losses": losses, "gathered": str(seen[0]), "state": sorted(map(str, state_dtypes))}


def test_bf16_compute_gathers_bf16_and_trains_like_the_cast_in_each_forward(tmp_path):
    values = tiny_config(tmp_path, "parallel.dp=2", "train.param_dtype=float32", "train.compute_dtype=bfloat16",
                         "train.steps=4")
    with_policy = run_ranks(_bf16_training, 2, values, True)
    without = run_ranks(_bf16_training, 2, values, False)
    for got, want in zip(with_policy, without, strict=True):
        assert got["gathered"] == "torch.bfloat16" and want["gathered"] == "torch.float32"
        assert got["state"] == want["state"] == ["torch.float32"]  # the shards, gradients and updates stay fp32
        assert all(torch.isfinite(torch.tensor(got["losses"])))
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-2, atol=0)

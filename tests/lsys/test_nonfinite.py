"""train.nonfinite: a step whose loss or gradient norm is not finite never updates the weights and is never
checkpointed; `stop` ends the run naming the step, `skip` skips it and stops after N in a row."""

from __future__ import annotations

import json

import pytest
import torch

from launch.cli import main
from launch.exits import NONFINITE
from lsys.config import config_from_dict
from lsys.metrics import read_metrics
from lsys.session import distributed_session
from lsys.step import StepWork
from lsys.trainer import Trainer
from tests.lsys.harness import tiny_config


def _poison_steps(monkeypatch, steps: set[int]) -> None:
    """Make the gradients of the given (0-based) steps NaN, as an overflow in backward would."""
    real = StepWork.accumulate_gradients
    calls = {"n": 0}

    def accumulate(self, micro_batches, global_tokens):
        loss_sum = real(self, micro_batches, global_tokens)
        if calls["n"] in steps:
            next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        calls["n"] += 1
        return loss_sum

    monkeypatch.setattr(StepWork, "accumulate_gradients", accumulate)


def _params(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {1})
    cfg = config_from_dict(tiny_config(tmp_path, "train.nonfinite=skip", "train.steps=3"))
    with distributed_session("cpu", 60.0) as session:
        trainer = Trainer(cfg, session)
        first = trainer.train_step(0)
        before = _params(trainer)
        state_before = {k: {n: v.clone() for n, v in s.items()} for k, s in trainer.optimizer.state.items()}
        skipped = trainer.train_step(1)
        after = _params(trainer)
        third = trainer.train_step(2)
    assert first["finite"] and third["finite"] and not skipped["finite"]
    assert skipped["grad_norm"] != skipped["grad_norm"]  # NaN
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, state in trainer.optimizer.state.items():
        assert int(state["step"]) == 2  # steps 0 and 2 only
        assert set(state) == set(state_before[key])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_stop_ends_the_run_at_the_step_with_no_checkpoint_after_it(tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {2})
    code = main(["train", "configs/demo.yaml", "model.hidden_size=32", "model.num_layers=1", "data.seq_len=32",
                 "data.curriculum.start_len=0", "train.steps=5", "train.global_batch_size=2", "train.log_every=1",
                 "checkpoint.every=1", "parallel.dp=1", "parallel.cp_ring=1", "train.device=cpu",
                 f"train.run_dir={tmp_path}"])
    assert code == NONFINITE
    err = capsys.readouterr().err
    assert "stopped at step 3: loss" in err and "train.nonfinite=stop" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["end_step"] == 3 and "step 3" in summary["stopped"]


def test_skip_counts_steps_and_stops_after_too_many_in_a_row(tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {1, 3, 4})
    args = ["train", "configs/demo.yaml", "model.hidden_size=32", "model.num_layers=1", "data.seq_len=32",
            "data.curriculum.start_len=0", "train.steps=8", "train.global_batch_size=2", "train.log_every=4",
            "parallel.dp=1", "parallel.cp_ring=1", "train.device=cpu", "train.nonfinite=skip",
            "train.nonfinite_max_skips=2", f"train.run_dir={tmp_path}"]
    assert main(args) == NONFINITE
    assert "2 non-finite steps in a row" in capsys.readouterr().err
    records = read_metrics(tmp_path / "metrics.jsonl")
    # skipped steps are always logged, the others every train.log_every
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(2, 1), (4, 2), (5, 3)]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=nan", "model.norm_eps=-1", "model.norm_eps=0",
                                      "train.collective_timeout_s=inf", "quant.decay=nan"])
def test_non_finite_and_impossible_numbers_are_refused(override, tmp_path, capsys):
    assert main(["train", "configs/demo.yaml", override, f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsys: invalid input: " + override.split("=")[0]) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()

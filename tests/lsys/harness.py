"""Shared by the trainer tests: a tiny float64 config, one run's losses and gradients, and their comparison.

float64 parameters and compute, so that "equal" means equal up to summation order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lsys.config import load_config, to_dict
from lsys.session import distributed_session
from lsys.trainer import Trainer


def tiny_config(run_dir, *overrides: str) -> dict[str, Any]:
    base = [
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "data.task=passkey", "data.seq_len=32", "train.steps=3", "train.global_batch_size=4",
        "train.param_dtype=float64", "train.compute_dtype=float64", "train.device=cpu", "train.log_every=1",
        "train.eval_samples=8", "train.warmup_steps=1", f"train.run_dir={run_dir}",
    ]
    return to_dict(load_config(None, [*base, *overrides]))


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def losses_and_grads(values: dict[str, Any], evaluate: bool = False) -> dict[str, Any]:
    """Every step's loss and the gradients the optimizer saw at every step (after clipping); with `evaluate` the
    held-out metrics after the last step too."""
    from lsys.config import config_from_dict

    cfg = config_from_dict(values)
    with distributed_session("cpu", 60.0) as session:
        trainer = Trainer(cfg, session)
        grads: list[list[torch.Tensor]] = []
        params = list(trainer.model.parameters())
        # Sharded (FSDP2, tensor-parallel) gradients are gathered whole: every rank joins, in the same order.
        trainer.optimizer.register_step_pre_hook(
            lambda *_: grads.append([_whole(p.grad).detach().clone() for p in params])
        )
        losses = [trainer.train_step(step)["loss"] for step in range(cfg.train.steps)]
        metrics = trainer.evaluate() if evaluate else None
    return {"losses": losses, "grads": grads, "eval": metrics}


def assert_same_training(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    torch.testing.assert_close(actual["losses"], expected["losses"], rtol=1e-10, atol=1e-12)
    assert len(actual["grads"]) == len(expected["grads"])
    for step, (got, want) in enumerate(zip(actual["grads"], expected["grads"], strict=True)):
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            # Relative to the tensor's scale: entries near zero are sums that cancel, so carry no own scale.
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10 * w.abs().max().item(),
                                       msg=lambda m, s=step, i=index: f"step {s} param {i}: {m}")

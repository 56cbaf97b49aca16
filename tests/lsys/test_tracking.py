"""Runs in TensorBoard (and W&B offline): what rank 0 logs is readable back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lsys.config import LoggingConfig
from lsys.tracking import RunTracking
from lsys.trainer import train_from_dict
from tests.distributed import run_ranks
from tests.lsys.harness import tiny_config


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_training_writes_every_logged_step_and_evaluation_to_tensorboard(tmp_path):
    values = tiny_config(tmp_path, "train.steps=4", "train.eval_every=2", "parallel.cp_ring=2")
    run_ranks(train_from_dict, 2, values)
    events = _events(tmp_path / "tensorboard")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "memory/peak_bytes_max",
                "memory/peak_bytes_rank0", "memory/peak_bytes_rank1"):
        assert len(events.Scalars(tag)) == 4, tag
    accuracy = events.Scalars("eval/passkey_accuracy")
    assert [e.step for e in accuracy] == [2, 4]
    assert accuracy[-1].value == pytest.approx([r for r in records if "split" in r][-1]["passkey_accuracy"])


def test_a_resumed_run_drops_the_events_after_its_resume_step(tmp_path):
    logging = LoggingConfig()
    first = RunTracking(logging, tmp_path, 0, {})
    for step in (1, 2, 3):
        first.step({"step": step, "loss": float(step)})
    first.close()
    resumed = RunTracking(logging, tmp_path, 2, {})  # step 3 is about to be trained again
    resumed.step({"step": 3, "loss": 30.0})
    resumed.close()
    assert [(e.step, e.value) for e in _events(tmp_path / "tensorboard").Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]


def test_pictures_become_images(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
    ax.imshow([[0, 1], [1, 0]])
    fig.savefig(tmp_path / "grid.png")
    plt.close(fig)
    tracking = RunTracking(LoggingConfig(), tmp_path, 0, {})
    tracking.image("eval/needle", tmp_path / "grid.png", 7)
    tracking.close()
    image = _events(tmp_path / "tensorboard").Images("eval/needle")[0]
    assert image.step == 7 and (image.width, image.height) == (100, 50)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_wandb_offline_run_keeps_the_scalars_locally(tmp_path):
    tracking = RunTracking(LoggingConfig(tensorboard=False, wandb=True), tmp_path, 0, {"model": {"hidden": 8}})
    tracking.step({"step": 1, "loss": 2.5})
    tracking.close()
    assert any((tmp_path / "wandb").glob("offline-run-*"))

"""What the launcher does for CUDA ranks, checked without a GPU: more local ranks than visible GPUs is refused
before any rank starts, and the ranks get the CUDA allocator's configuration unless the user set their own."""

from __future__ import annotations

import os

import pytest
import torch

from launch.local import CUDA_ALLOC_CONF, cuda_allocator_environment, spawn
from launch.preflight import check_gpus
from lsys.config import load_config


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_more_local_ranks_than_gpus_is_refused(monkeypatch, device):
    cfg = load_config("configs/demo.yaml", [f"train.device={device}"])
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    check_gpus(cfg, local_ranks=2)
    with pytest.raises(ValueError) as refused:
        check_gpus(cfg, local_ranks=4)
    assert str(refused.value) == (f"train.device={device!r}: 4 local ranks but 2 visible GPU(s) "
                                  "(CUDA_VISIBLE_DEVICES=0,1); start at most 2 ranks on this machine, or set "
                                  "train.device=cpu")


def test_cuda_without_a_gpu_is_refused_and_cpu_ranks_are_not_counted(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="train.device='cuda' but no CUDA device is visible"):
        check_gpus(load_config("configs/demo.yaml", ["train.device=cuda"]), local_ranks=1)
    check_gpus(load_config("configs/demo.yaml", ["train.device=auto"]), local_ranks=8)
    _gpus(monkeypatch, 1)
    check_gpus(load_config("configs/demo.yaml", ["train.device=cpu"]), local_ranks=8)


def _allocator_settings() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}


def test_the_users_allocator_configuration_is_kept():
    assert cuda_allocator_environment({}) == {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        assert cuda_allocator_environment({name: "max_split_size_mb:256"}) == {name: "max_split_size_mb:256"}


def test_ranks_get_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert spawn(_allocator_settings, 1)[0]["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    assert spawn(_allocator_settings, 1)[0]["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256"

"""The fences around torch's and Ray's private APIs find everything they need on the installed versions, so an
upgrade that drops one fails here, with the fence's message, and not deep inside a run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from launch import _ray_compat
from parallel import _compat


def test_torch_fence_resolves_and_names_what_is_missing():
    assert _compat.WAIT_TENSOR is torch.ops._c10d_functional.wait_tensor.default
    assert all(r.alias_info is not None for r in _compat.operator_returns(torch.ops.aten.view.default))
    assert not _compat.in_backward()
    with pytest.raises(RuntimeError, match=r"torch\.nowhere\.thing.*tested with torch 2\.13\.0"):
        _compat._private("torch.nowhere", "thing")
    with pytest.raises(RuntimeError, match=r"UntypedStorage\.no_such_method.*tested with torch 2\.13\.0"):
        _compat._attribute(torch.UntypedStorage, "no_such_method")


def test_shard_position_of_a_dtensor(tmp_path):
    # One rank: a Shard(0) DTensor's shard is the whole tensor, at offset 0.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        param = distribute_tensor(torch.zeros(6, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        assert _compat.shard_position(param) == ((6, 4), (0, 0))
    finally:
        dist.destroy_process_group()


def test_kernels_private_operators_exist():
    # kernels/attention.py calls them directly: kernels/ sits below the fence.
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def test_storage_resize_swap_reports_and_is_undone():
    original = torch.UntypedStorage.resize_
    seen = []
    storage = torch.empty(4).untyped_storage()
    with _compat.storage_resizes_reported(lambda s: seen.append(s.nbytes())):
        storage.resize_(32)
        storage.resize_(0)
    storage.resize_(8)  # after leaving: not reported
    assert seen == [32, 0]
    assert torch.UntypedStorage.resize_ is original


def test_shape_inference_swap_is_entered_and_undone():
    name = "_propagate_tensor_meta_non_cached"
    original = getattr(_compat._ShardingPropagator, name)
    with _compat.dtensor_shape_inference_inside(contextlib.nullcontext):
        assert getattr(_compat._ShardingPropagator, name) is not original
    assert getattr(_compat._ShardingPropagator, name) is original


def test_ray_fence_resolves_every_private_name():
    for name in _ray_compat.PRIVATE:
        assert getattr(_ray_compat, name) is not None, name
    assert _ray_compat.gpus_on_this_machine() >= 0


def test_ray_fence_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(_ray_compat.PRIVATE, "Gone", ("ray._private.nowhere", "Gone"))
    with pytest.raises(RuntimeError, match=r"ray\._private\.nowhere\.Gone.*tested with ray 2\.60\.0"):
        _ray_compat.Gone  # noqa: B018 - the lookup is what is tested

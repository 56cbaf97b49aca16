"""Merge two partial attention results over disjoint key sets by their log-sum-exp.

If `out_a, lse_a` is attention over keys A and `out_b, lse_b` over keys B, the attention over A and B is
`lse = logaddexp(lse_a, lse_b)`, `out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b`. It is evaluated
in the stable form `out_a + sigmoid(lse_b - lse_a) * (out_b - out_a)` (a lerp), which never exponentiates a
positive number. Callers keep the running (out, lse) in fp32 or wider: accumulating in bf16 makes the error
grow with the number of merged blocks (the ring size).
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """out: [B, S, H, D]; lse: [B, H, S] (the running result) -> merged (out, lse) in the dtypes of out/lse.

    block_out: [B, S, H, D], block_lse: [B, H, S] in any dtype; they are upcast to the running dtypes.
    A row whose lse is -inf saw no key (fully masked, or the empty start `zeros, -inf`): it contributes
    nothing, whatever its out holds, so the result has no NaN from it. Pure function: inputs are not modified.
    """
    block_out = block_out.to(out.dtype)
    block_lse = block_lse.to(lse.dtype)
    new_lse = torch.logaddexp(lse, block_lse)
    # weight of the block, [B, H, S] -> [B, S, H, 1] to broadcast over D
    weight = torch.sigmoid(block_lse - lse).transpose(1, 2).unsqueeze(-1)
    merged = torch.lerp(out, block_out, weight.to(out.dtype))
    # -inf rows would turn into NaN through (-inf) - (-inf) or 0 * garbage: pick the other side exactly.
    block_empty = torch.isneginf(block_lse).transpose(1, 2).unsqueeze(-1)
    running_empty = torch.isneginf(lse).transpose(1, 2).unsqueeze(-1)
    merged = torch.where(block_empty, out, torch.where(running_empty, block_out, merged))
    return merged, new_lse

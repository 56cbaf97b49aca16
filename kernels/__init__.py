"""Pure tensor kernels: block attention with log-sum-exp, its backward, their references, int8 activation storage.

No nn.Module, no torch.distributed, no configuration, no import-time side effects.
"""

from kernels.attention import attention, attention_backward, attention_forward
from kernels.quant import dequantize_int8, group_range, quantize_int8, scale_shift_from_range
from kernels.reference import reference_attention_backward, reference_attention_forward

__all__ = [
    "attention",
    "attention_backward",
    "attention_forward",
    "dequantize_int8",
    "group_range",
    "quantize_int8",
    "reference_attention_backward",
    "reference_attention_forward",
    "scale_shift_from_range",
]

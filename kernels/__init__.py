"""Pure tensor kernels: block attention with log-sum-exp, its backward, and their references.

No nn.Module, no torch.distributed, no configuration, no import-time side effects.
"""

from kernels.attention import attention, attention_backward, attention_forward
from kernels.reference import reference_attention_backward, reference_attention_forward

__all__ = [
    "attention",
    "attention_backward",
    "attention_forward",
    "reference_attention_backward",
    "reference_attention_forward",
]

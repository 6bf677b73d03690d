"""The ops the model is built from, one function each, with a `backend` argument.

Each function holds the plain PyTorch path (the CPU fallback and the readable definition of the op) and hands
CUDA tensors to the Triton kernel in `minigrok.kernels` when triton imports (see `_dispatch.use_triton`).
"""

from ._dispatch import BACKENDS, triton_available, use_triton
from .attention import attention, attention_mask, ring_positions
from .cross_entropy import cross_entropy, linear_cross_entropy, soft_cap
from .distillation import DistillationLoss, linear_distillation_loss
from .quantized_matmul import dequantize, quantized_matmul
from .rms_norm import rms_norm
from .rope import apply_rope, rope_cos_sin
from .swiglu import swiglu

__all__ = [
    "BACKENDS",
    "DistillationLoss",
    "apply_rope",
    "attention",
    "attention_mask",
    "cross_entropy",
    "dequantize",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "quantized_matmul",
    "ring_positions",
    "rms_norm",
    "rope_cos_sin",
    "soft_cap",
    "swiglu",
    "triton_available",
    "use_triton",
]

"""Test-wide setup: Triton kernels run in the CPU interpreter when no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when @triton.jit decorates, so it must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

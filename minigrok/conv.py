"""ShortConv: a gated causal short depthwise convolution, the token mixer of the C layers of `layer_pattern`.

As in LFM2 (after H3's short convolutions): one projection gives three gates b, c and x of the normed input;
y = out(c * conv(b * x)), where conv is a causal depthwise convolution of `conv_kernel_size` taps over time. A
token sees only the last k - 1 gated inputs b * x before it, so decoding needs those alone, whatever the length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

if TYPE_CHECKING:
    from .model import KVCache


class ShortConv(nn.Module):
    """The mixer: in_proj dim -> 3 * dim (b, c, x), a depthwise causal conv1d `weight` [dim, 1, k], out_proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.weight = nn.Parameter(torch.empty(config.dim, 1, config.conv_kernel_size))
        self.out_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """The mixed x [B, T, dim]; with a cache, each row's inputs go on after its cached ones at logical `layer`."""
        b, c, x = self.in_proj(x).chunk(3, dim=-1)
        inputs = b * x
        if cache is None:  # zeros before the first token
            window = F.pad(inputs, (0, 0, self.weight.shape[-1] - 1, 0))
        else:  # the k - 1 cached inputs before each row's first new one, then the new ones
            window = cache.conv_window(layer, inputs, self.weight.shape[-1])
        mixed = F.conv1d(window.transpose(1, 2), self.weight.to(window.dtype), groups=self.weight.shape[0])
        return self.out_proj(c * mixed.transpose(1, 2))

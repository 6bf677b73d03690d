"""Sparse mixture-of-experts MLP: a router sends each token to its top-k of n_experts SwiGLU (or, with mlp="relu2",
ReLU²) experts.

Routing: softmax over all experts' logits, the k largest probabilities kept as the weights, not renormalised (as in
Switch/GShard: with k = 1 the router still gets a gradient through the output). Tokens are sorted by expert
(a stable argsort, so ties keep token order and routing is deterministic) and each expert multiplies its own
contiguous slice: one matmul per expert on CPU, one `torch._grouped_mm` over all slices on CUDA in bf16 (weights or
autocast); under
torch.compile without gradients (generate's decode step is one static graph) each token gathers its experts' weights.

A capacity factor c caps each expert at ceil(c * tokens * k / n_experts) assignments in training; the later tokens
(in batch-major order) past it are dropped for that expert and pass through the residual alone. Evaluation and
generation are always dropless, so a cached decode routes each token as the full forward does.

Each forward records two router losses in `losses`, for the trainer to weight and add: the load-balancing loss
n_experts * sum_i f_i * P_i (f_i: the fraction of assignments to expert i, P_i: its mean router probability; 1 when
balanced) and the z-loss mean(logsumexp(logits)^2), which keeps the logits small.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional
from .config import ModelConfig


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, how: str):
    """Each row of x [N, in] times its expert's weight[e]^T (weight [E, out, in]). The rows are sorted by expert:
    `experts` [N] holds each row's, `counts` [E] how many rows each expert has.

    how: "loop" one matmul per expert's slice; "grouped" one torch._grouped_mm (strides multiples of 16 bytes);
    "gather" each row multiplies its expert's gathered weights (static shapes, for torch.compile's full graphs).
    """
    if how == "gather":
        return torch.bmm(weight[experts], x[:, :, None]).squeeze(-1)
    if how == "grouped":  # autocast passes _grouped_mm by: cast to its dtype here
        dtype = matmul_dtype(x)
        return torch._grouped_mm(x.to(dtype), weight.to(dtype).transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    slices = x.split(counts.tolist())
    return torch.cat([rows @ weight[expert].T for expert, rows in enumerate(slices)])


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on (mixed-precision training), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def matmul_kind(x: torch.Tensor, hidden: int) -> str:
    """How the experts multiply (see expert_matmul): gathered in a compiled inference step (generate's decode step is
    one static graph), one torch._grouped_mm on CUDA in bf16 (or bf16 autocast) with 16-byte aligned rows, else one matmul per expert
    (compiled training breaks its graph there)."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return "gather"
    aligned = x.shape[-1] % 8 == 0 and hidden % 8 == 0
    grouped = x.is_cuda and matmul_dtype(x) == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm")
    return "grouped" if grouped else "loop"


class MoE(nn.Module):
    """Router, n_experts stacked SwiGLU experts ([n_experts, 2 * moe_ffn_dim, dim] and [n_experts, dim, moe_ffn_dim],
    the nn.Linear layout; ReLU² experts: `up_proj` [n_experts, moe_ffn_dim, dim]) and an optional `shared` MLP that
    every token also goes through."""

    def __init__(self, config: ModelConfig, shared: nn.Module | None = None):
        super().__init__()
        experts, hidden = config.n_experts, config.moe_ffn_dim
        self.router = nn.Linear(config.dim, experts, bias=False)
        self.relu2 = config.mlp == "relu2"
        if self.relu2:
            self.up_proj = nn.Parameter(torch.empty(experts, hidden, config.dim))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, config.dim))
        self.down_proj = nn.Parameter(torch.empty(experts, config.dim, hidden))
        self.shared = shared
        self.k, self.capacity_factor = config.experts_per_token, config.moe_capacity_factor
        self.backend = config.backend
        self.losses: list[tuple[torch.Tensor, torch.Tensor]] = []  # (balance, z) of each forward; the model clears it

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's chosen experts and their weights, both [N, k], and each expert's count of tokens [E];
        records the router losses."""
        logits = self.router(flat).float()
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.k, dim=-1)
        counts = F.one_hot(chosen.flatten(), probs.shape[-1]).sum(dim=0)  # not bincount: a static shape
        balance = probs.shape[-1] * (counts / chosen.numel() * probs.mean(dim=0)).sum()
        self.losses.append((balance, logits.logsumexp(dim=-1).square().mean()))
        return chosen, weights.to(flat.dtype), counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights, counts = self.route(flat)
        order = chosen.flatten().argsort(stable=True)  # assignments grouped by expert, in token order within each
        experts = chosen.flatten()[order]
        if self.capacity_factor is not None and self.training:
            capacity = math.ceil(self.capacity_factor * chosen.numel() / counts.numel())
            rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[experts]
            kept = rank < capacity
            order, experts, counts = order[kept], experts[kept], counts.clamp(max=capacity)
        tokens = order // self.k
        how = matmul_kind(flat, self.down_proj.shape[-1])
        if self.relu2:
            hidden = F.relu(expert_matmul(flat[tokens], self.up_proj, experts, counts, how)).square()
        else:
            gate, up = expert_matmul(flat[tokens], self.gate_up_proj, experts, counts, how).chunk(2, dim=-1)
            hidden = functional.swiglu(gate, up, backend=self.backend)
        out = expert_matmul(hidden, self.down_proj, experts, counts, how)
        y = torch.zeros_like(flat).index_add(0, tokens, out * weights.flatten()[order, None])
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view_as(x)

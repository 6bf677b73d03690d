"""MiniGrok: a compact pre-norm decoder (RMSNorm, RoPE, SwiGLU or ReLU², GQA/MQA, QK-norm, shared-parameter layers,
factorised embeddings)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import functional
from .config import ModelConfig
from .conv import ShortConv
from .generate import generate_batch, stream
from .machine import reading_back_is_free
from .moe import MoE

if TYPE_CHECKING:
    from .speculative import SpeculativeStats


class ModelOutput:
    """`logits` [B, T, vocab], or, when targets were given, the mean token cross-entropy `loss`.

    With targets the head and the loss run fused (minigrok.functional.linear_cross_entropy), so the [B, T, vocab]
    logits never exist; reading `.logits` then raises instead of handing back something half-made.
    """

    def __init__(self, logits: torch.Tensor | None = None, loss: torch.Tensor | None = None):
        self._logits, self.loss = logits, loss

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            raise AttributeError(
                "logits are not materialised when targets are given (the head is fused with the loss); "
                "call model(input_ids) without targets to get them"
            )
        return self._logits


class KVCache:
    """Static key/value buffers [n_full_attention_layers, B, n_kv_heads, max_len, head_dim] with each row's length
    held as a tensor: every decode step has the same shapes whatever the positions (gpt-fast style).

    Row b holds its tokens at positions 0 .. lengths[b] - 1; a step writes each row at its own next position and
    attends over the whole buffer, each row seeing its own keys only (`functional.attention(key_lengths=)`). Rows
    are slots: `reset(rows)` empties some for new sequences while the others go on. The RoPE tables for max_len
    positions are built once, here.

    Only full attention layers hold max_len positions. The others keep rings bounded whatever the row's length,
    position p at slot p % slots, each the reach of a position (window - 1 keys, or k - 1 conv inputs, before it)
    plus `rollback`: how far a row's length may be set back below the furthest position written, and how many tokens
    a forward may add to a row, with every state the next forward needs still there (speculative decoding).
    Windowed attention layers (config.layer_windows) keep `ring_keys`/`ring_values` [n_windowed, B, n_kv_heads,
    window - 1 + rollback, head_dim]. Convolution layers (layer_pattern C) keep `conv_inputs` [n_conv, B, k - 1 +
    rollback + 1, dim] of their gated inputs, whose last slot takes the writes a forward must not keep: the padding
    past a prefilled row's `ends`, positions older than the ring.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        rollback: int = 1,
    ):
        self.windows = config.layer_windows()
        # Each logical layer's buffers: A full keys and values, W a windowed layer's rings, C conv inputs.
        stores = "".join(
            "C" if kind == "C" else "A" if window is None else "W"
            for kind, window in zip(config.layer_kinds(), self.windows, strict=True)
        )
        self.index = [stores.count(store, 0, layer) for layer, store in enumerate(stores)]  # within its buffers
        self.rollback = rollback
        shape = (stores.count("A"), batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.window_ring = min(max_len, (config.window or 1) - 1 + rollback)
        ring_shape = (stores.count("W"), batch_size, config.n_kv_heads, self.window_ring, config.head_dim)
        self.ring_keys = torch.zeros(ring_shape, dtype=dtype, device=device)
        self.ring_values = torch.zeros(ring_shape, dtype=dtype, device=device)
        self.conv_ring = config.conv_kernel_size - 1 + rollback
        conv_shape = (stores.count("C"), batch_size, self.conv_ring + 1, config.dim)
        self.conv_inputs = torch.zeros(conv_shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # positions written in each row
        self.cos, self.sin = functional.rope_cos_sin(
            torch.arange(max_len, device=device), config.head_dim, config.rope_theta
        )
        self.empty = True  # no row holds a token: a multi-token input is a prefill from position 0 (known host-side)
        self.rows = torch.arange(batch_size, device=device)[:, None]
        # Of the forward pass under way; `ends`: in a prefill of right-padded rows, each row's own length.
        self.positions = self.key_lengths = self.ends = None

    def start(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Begin a forward of `length` tokens per row: fix their positions; return their cos/sin tables."""
        if not self.empty and length > self.rollback and len(self.ring_keys):
            raise ValueError(
                f"a forward of {length} tokens continuing the cache needs rollback >= {length} for the windowed "
                f"layers, which have rollback={self.rollback}: build the KVCache with rollback={length}"
            )
        self.positions = self.lengths[:, None] + torch.arange(length, device=self.lengths.device)  # [B, T]
        # A prefill of empty rows attends causally over its own keys alone (the fast causal path); anything else
        # attends over the whole buffer, each query seeing its row's keys up to its own position.
        self.key_lengths = None if self.empty and length > 1 else self.lengths + length
        return self.cos[self.positions], self.sin[self.positions]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, D] at each row's positions; return the keys, values and key lengths to attend over
        (None: the causal prefill of an empty cache attends over k and v alone)."""
        index = self.index[layer]
        if self.windows[layer] is not None:
            keys, values = self.ring_keys[index], self.ring_values[index]
            self.write_ring(keys, k)
            self.write_ring(values, v)
        else:
            keys, values = self.keys[index], self.values[index]
            keys[self.rows, :, self.positions] = k.transpose(1, 2).to(keys.dtype)
            values[self.rows, :, self.positions] = v.transpose(1, 2).to(values.dtype)
        if self.key_lengths is None:
            return k, v, None
        return keys, values, self.key_lengths

    def write_ring(self, ring: torch.Tensor, new: torch.Tensor) -> None:
        """Write new [B, Hkv, T, D] into a windowed layer's ring [B, Hkv, slots, D]; past `slots` tokens each slot
        takes the last one that lands there before the row's end (its real end, in a right-padded prefill)."""
        slots = self.window_ring
        if new.shape[2] <= slots:  # distinct slots: a scatter
            ring[self.rows, :, self.positions % slots] = new.transpose(1, 2).to(ring.dtype)
            return
        ends = self.positions[:, -1] + 1 if self.ends is None else self.ends
        offset = functional.ring_positions(ends, slots) - self.positions[:, :1]  # [B, slots] into `new`
        gathered = new.gather(2, offset.clamp(min=0)[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3]))
        ring.copy_(torch.where((offset >= 0)[:, None, :, None], gathered.to(ring.dtype), ring))

    def right_padded(self, lengths: torch.Tensor) -> None:
        """The next forward is of right-padded rows: row b's tokens end at lengths[b], which become the lengths; its
        rings keep its own last positions, not the padding's."""
        self.ends = lengths

    def conv_window(self, layer: int, inputs: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """A conv layer's inputs at positions first - k + 1 .. last [B, k - 1 + T, dim] (zeros before position 0)
        given the new ones [B, T, dim], which then go into the ring."""
        buffer = self.conv_inputs[self.index[layer]]
        before = self.positions[:, :1] + torch.arange(1 - kernel_size, 0, device=buffer.device)  # [B, k - 1]
        slots = self.conv_ring
        cached = buffer[self.rows, before.clamp(min=0) % slots] * (before >= 0)[..., None]
        end = self.positions[:, -1:] + 1 if self.ends is None else self.ends[:, None]
        keep = (self.positions < end) & (self.positions >= end - slots)  # distinct slots: the last ring ones
        buffer[self.rows, torch.where(keep, self.positions % slots, slots)] = inputs.to(buffer.dtype)
        return torch.cat([cached.to(inputs.dtype), inputs], dim=1)

    def advance(self, length: int) -> None:
        if self.ends is None:
            self.lengths += length
        else:
            self.lengths.copy_(self.ends)
            self.ends = None
        self.empty = False

    def slots(self, start: int, stop: int) -> KVCache:
        """Rows start .. stop - 1 as a cache of their own that shares these buffers: a forward through it reads and
        writes those rows alone (a decode step of the busy rows, a prefill into free ones) while the others keep
        their state."""
        view = copy.copy(self)
        view.keys, view.values = self.keys[:, start:stop], self.values[:, start:stop]
        view.ring_keys, view.ring_values = self.ring_keys[:, start:stop], self.ring_values[:, start:stop]
        view.conv_inputs = self.conv_inputs[:, start:stop]
        view.lengths, view.rows = self.lengths[start:stop], self.rows[: stop - start]
        view.empty = False
        return view

    def copy_row(self, source: int, target: int) -> None:
        """Make row `target` a copy of row `source` (its keys, values, rings and length)."""
        length = int(self.lengths[source])
        for buffer in (self.keys, self.values):
            buffer[:, target, :, :length] = buffer[:, source, :, :length]
        for buffer in (self.ring_keys, self.ring_values, self.conv_inputs):
            buffer[:, target] = buffer[:, source]
        self.lengths[target] = length

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Empty the given rows (all by default): their stale keys are masked out until overwritten."""
        if rows is None:
            self.lengths.zero_()
            self.empty = True
        else:
            self.lengths[rows] = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual` the pair (norm(x + residual), x + residual) in one pass."""
        return functional.rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)


class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads; q, k and v come from one fused projection. With
    qk_norm, each query and key head is RMS-normed over head_dim (q_norm, k_norm: one gain each) before RoPE.

    Its three steps are separate methods so that selective activation checkpointing (Block) can keep the attention
    op's tensors while it recomputes the projections around it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps, config.backend) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps, config.backend) if config.qk_norm else None
        self.backend = config.backend
        self.windows = config.layer_windows()  # the window at each logical layer (a shared block runs at several)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, H, T, D] and k, v [B, Hkv, T, D] of x [B, T, dim], q and k normed (qk_norm), then rotated (RoPE)."""
        batch, length, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        # [B, T, H*D] -> [B, H, T, D] as strided views; the ops take any strides.
        q = q.view(batch, length, self.n_heads, self.head_dim)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # in v's dtype: under autocast the norm's float32 gain would promote q and k
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = functional.apply_rope(q, k, cos, sin, backend=self.backend)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_lengths: torch.Tensor | None = None,
        window: int | None = None,
    ):
        """Causal attention of q over k, v: [B, H, T, D]; with a KV cache's `key_lengths` [B], over each row's keys;
        with `window`, each query sees itself and the window - 1 positions before it."""
        return functional.attention(q, k, v, causal=True, window=window, backend=self.backend, key_lengths=key_lengths)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The heads of y [B, H, T, D] merged and projected back to [B, T, dim]."""
        return self.o_proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up as one fused projection; with mlp="relu2",
    down(relu(up(x))^2) (two matrices, as in modded-nanogpt and Primer)."""

    def __init__(self, config: ModelConfig, ffn_dim: int | None = None):
        super().__init__()
        ffn_dim = config.ffn_dim if ffn_dim is None else ffn_dim
        self.relu2 = config.mlp == "relu2"
        if self.relu2:
            self.up_proj = nn.Linear(config.dim, ffn_dim, bias=False)
        else:
            self.gate_up_proj = nn.Linear(config.dim, 2 * ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, config.dim, bias=False)
        self.backend = config.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu2:
            return self.down_proj(F.relu(self.up_proj(x)).square())
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(functional.swiglu(gate, up, backend=self.backend))


# Activation checkpointing of each block (each logical layer: a shared block is checkpointed at every depth it runs):
# none keeps every activation for backward; full keeps only the block's input and recomputes the block in backward;
# selective also keeps the attention op's inputs and outputs, so backward recomputes everything but attention.
CHECKPOINTING = ("none", "full", "selective")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)); `kind` C puts a ShortConv `conv` in place of
    attention (attn_norm then norms its input), and with `moe` the MLP is a mixture of experts. Selective
    checkpointing recomputes a conv block whole.

    `checkpointing` (see CHECKPOINTING) trades compute for memory with non-reentrant torch.utils.checkpoint. The
    checkpoints are taken inside forward, so hooks on the block itself (FSDP's unshard) run once per call, outside
    the recomputed region.
    """

    def __init__(self, config: ModelConfig, kind: str = "A", moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, config.backend)
        self.attn = Attention(config) if kind == "A" else None
        self.conv = ShortConv(config) if kind == "C" else None
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, config.backend)
        shared = MLP(config, config.moe_ffn_dim) if moe and config.moe_shared_expert else None
        self.mlp = MoE(config, shared) if moe else MLP(config)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, checkpointing: str = "none") -> torch.Tensor:
        if checkpointing == "full" or (checkpointing == "selective" and self.conv is not None):
            return checkpoint(self.forward, x, cos, sin, cache, layer, use_reentrant=False)
        if self.conv is not None:
            return self.after_mixer(self.conv(self.attn_norm(x), cache, layer), x)
        if checkpointing == "selective":
            # The attention op runs outside the checkpoints, so its inputs and outputs are kept for backward.
            q, k, v = checkpoint(self.attention_inputs, x, cos, sin, use_reentrant=False)
            y = self.attn.attend(q, k, v, window=self.attn.windows[layer])
            return checkpoint(self.after_attention, y, x, use_reentrant=False)
        q, k, v = self.attention_inputs(x, cos, sin)
        key_lengths = None
        if cache is not None:
            k, v, key_lengths = cache.update(layer, k, v)
        return self.after_attention(self.attn.attend(q, k, v, key_lengths, self.attn.windows[layer]), x)

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return self.attn.project(self.attn_norm(x), cos, sin)

    def after_attention(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output from the attention heads y and its input x."""
        return self.after_mixer(self.attn.output(y), x)

    def after_mixer(self, mixed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output from its mixer's output [B, T, dim] and its input x."""
        normed, x = self.mlp_norm(mixed, residual=x)  # the residual add fused into the norm
        return x + self.mlp(normed)


def block_shapes(config: ModelConfig, kind: str = "A", moe: bool = False) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors of one block of mixer `kind` (A or C), dense or with `moe` a mixture of experts,
    in the order Block registers them."""
    dim, head_dim = config.dim, config.head_dim
    mixer = {
        "attn.qkv_proj.weight": ((config.n_heads + 2 * config.n_kv_heads) * head_dim, dim),
        "attn.o_proj.weight": (dim, config.n_heads * head_dim),
    }
    if config.qk_norm:
        mixer |= {"attn.q_norm.weight": (head_dim,), "attn.k_norm.weight": (head_dim,)}
    if kind == "C":
        mixer = {
            "conv.weight": (dim, 1, config.conv_kernel_size),
            "conv.in_proj.weight": (3 * dim, dim),
            "conv.out_proj.weight": (dim, dim),
        }
    shapes = {"attn_norm.weight": (dim,), **mixer, "mlp_norm.weight": (dim,)}
    # The MLP's input projection: SwiGLU's fused gate and up, or ReLU²'s up alone.
    up_name, up_rows = ("up_proj", 1) if config.mlp == "relu2" else ("gate_up_proj", 2)
    if not moe:
        return shapes | {
            f"mlp.{up_name}.weight": (up_rows * config.ffn_dim, dim),
            "mlp.down_proj.weight": (dim, config.ffn_dim),
        }
    experts, hidden = config.n_experts, config.moe_ffn_dim
    shapes |= {
        f"mlp.{up_name}": (experts, up_rows * hidden, dim),
        "mlp.down_proj": (experts, dim, hidden),
        "mlp.router.weight": (experts, dim),
    }
    if config.moe_shared_expert:
        shapes |= {
            f"mlp.shared.{up_name}.weight": (up_rows * hidden, dim),
            "mlp.shared.down_proj.weight": (dim, hidden),
        }
    return shapes


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of MiniGrok(config).state_dict(), by arithmetic alone: a checkpoint is checked
    against its config before anything is built or allocated."""
    outside = outside_shapes(config)
    shapes = {name: shape for name, shape in outside.items() if name.startswith("embed")}
    for index, (kind, moe) in enumerate(zip(config.block_kinds(), config.moe_blocks(), strict=True)):
        shapes |= {f"blocks.{index}.{name}": shape for name, shape in block_shapes(config, kind, moe).items()}
    return shapes | {name: shape for name, shape in outside.items() if not name.startswith("embed")}


def outside_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors outside the blocks, in the order MiniGrok registers them: the embedding (with
    embed_dim, embed_dim wide and projected up to dim), the final norm, the down projection to embed_dim and an
    untied head."""
    width = config.embed_dim or config.dim
    shapes = {"embed.weight": (config.vocab_size, width)}
    if config.embed_dim:
        shapes["embed_proj.weight"] = (config.dim, width)
    shapes["norm.weight"] = (config.dim,)
    if config.embed_dim:
        shapes["head_proj.weight"] = (width, config.dim)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, width)
    return shapes


class MiniGrok(nn.Module):
    """The decoder. `blocks` holds the n_unique_layers physical blocks; `layer_blocks[i]` is the block run at layer i.

    With embed_dim the vocabulary-sized matrices are embed_dim wide: tokens are embedded at embed_dim and projected up
    (embed_proj), and the final hidden state is projected down (head_proj, a matrix of its own, not embed_proj's
    transpose: reading out of the residual stream is not the inverse of writing into it) before the head.

    `activation_checkpointing` (one of CHECKPOINTING, "none" by default) applies to forward passes that build a
    graph; it is a choice of how to train, not part of the model, so it is an attribute rather than a config field.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        width = config.embed_dim or config.dim
        self.embed = nn.Embedding(config.vocab_size, width)
        self.embed_proj = nn.Linear(width, config.dim, bias=False) if config.embed_dim else None
        self.blocks = nn.ModuleList(
            Block(config, kind, moe) for kind, moe in zip(config.block_kinds(), config.moe_blocks(), strict=True)
        )
        self.layer_blocks = config.layer_blocks()
        self.norm = RMSNorm(config.dim, config.norm_eps, config.backend)
        self.head_proj = nn.Linear(config.dim, width, bias=False) if config.embed_dim else None
        self.lm_head = None if config.tie_embeddings else nn.Linear(width, config.vocab_size, bias=False)
        self.activation_checkpointing = "none"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * n_layers) (GPT-2), or zero
        with zero_init_proj (each block starts as the identity); conv taps uniform in +-1/sqrt(k), as torch's Conv1d;
        the embedding's projections normal(0, 1/sqrt(fan_in)), which keep the scale of what they project."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith("conv.weight"):
                bound = 1 / math.sqrt(self.config.conv_kernel_size)
                nn.init.uniform_(param, -bound, bound)
            elif name in ("embed_proj.weight", "head_proj.weight"):
                nn.init.normal_(param, std=1 / math.sqrt(param.shape[1]))
            elif name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj")):
                if self.config.zero_init_proj:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(param, std=std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def check_input_ids(self, input_ids: torch.Tensor, start: int = 0, values: bool = True) -> None:
        """Raise ValueError for a sequence past max_seq_len or (with `values`) ids outside the vocabulary."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [batch, seq]; got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if start + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {start + input_ids.shape[1]} exceeds max_seq_len={self.config.max_seq_len}: "
                "truncate the input or build the model with a larger max_seq_len"
            )
        if values and input_ids.numel() and not torch.compiler.is_compiling():  # compiled graphs skip value checks
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"token id {low if low < 0 else high} is outside the vocabulary [0, {self.config.vocab_size}): "
                    "check the tokenizer matches the model's vocab_size"
                )

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> ModelOutput:
        """Logits for input_ids [B, T]; or, with `targets` [B, T] (-100 = ignore), the mean loss alone.

        With a `cache`, input_ids continue each row of the cached sequences and the cache advances by T.
        """
        # Reading back would make every forward wait on a GPU: there generate() checks each prompt once.
        free = reading_back_is_free(input_ids)
        start = int(cache.lengths.max()) if cache is not None and free else 0
        self.check_input_ids(input_ids, start, values=free)
        if cache is not None and start + input_ids.shape[1] > cache.keys.shape[3]:
            raise ValueError(
                f"{input_ids.shape[1]} tokens after {start} cached ones overflow the cache's max_len="
                f"{cache.keys.shape[3]}: build the KVCache with a larger max_len"
            )
        x = self.hidden_states(input_ids, cache)
        if targets is None:
            return ModelOutput(logits=self.logits(x))
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets{tuple(targets.shape)} must have the shape of input_ids{tuple(input_ids.shape)}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be integer token ids (int64), not {targets.dtype}; -100 marks ignored ones")
        loss = functional.linear_cross_entropy(
            x.flatten(0, 1),
            self.head_weight,
            targets.flatten(),
            softcap=self.config.logit_softcap,
            backend=self.config.backend,
        )
        return ModelOutput(loss=loss)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, dim] (with embed_dim: projected down to [B, T, embed_dim]) that the
        head turns into logits (a teacher's, for distillation), unchecked: forward and generate check the ids."""
        if cache is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            cos, sin = functional.rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        else:
            cos, sin = cache.start(input_ids.shape[1])
        for block in self.blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.losses.clear()
        x = self.embed(input_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        checkpointing = self.activation_checkpointing if torch.is_grad_enabled() and cache is None else "none"
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing={checkpointing!r} is unknown: choose one of {CHECKPOINTING}")
        for layer, block_index in enumerate(self.layer_blocks):
            x = self.blocks[block_index](x, cos, sin, cache, layer, checkpointing)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = self.norm(x)
        return x if self.head_proj is None else self.head_proj(x)

    def router_losses(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The MoE layers' load-balancing and z losses of the last forward, each a mean over the MoE layer positions
        run (None for a dense model): what training adds, weighted by train.moe_aux_loss_weight and moe_z_loss_weight.
        """
        losses = [loss for block in self.blocks if isinstance(block.mlp, MoE) for loss in block.mlp.losses]
        if not losses:
            return None
        balance, z = zip(*losses, strict=True)
        return torch.stack(balance).mean(), torch.stack(z).mean()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head: vocabulary logits of hidden states [..., dim or embed_dim] (see hidden_states), soft-capped by
        config.logit_softcap if set; a quantised head multiplies its packed weight."""
        head = self.embed if self.lm_head is None else self.lm_head
        logits = head.linear(hidden) if hasattr(head, "linear") else hidden @ self.head_weight.T
        return functional.soft_cap(logits, self.config.logit_softcap)

    # -- generation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: list[int] | None = None,
        seed: int | None = None,
        compile: bool = False,
        draft_model: MiniGrok | None = None,
        num_draft_tokens: int = 4,
        stats: SpeculativeStats | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, [B], one step at a time (see `generate`)."""
        sampling = (max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, compile)
        yield from stream(self, input_ids, *sampling, draft_model, num_draft_tokens, stats)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: list[int] | None = None,
        seed: int | None = None,
        compile: bool = False,
        draft_model: MiniGrok | None = None,
        num_draft_tokens: int = 4,
        stats: SpeculativeStats | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] extended by up to max_new_tokens sampled tokens; greedy when temperature == 0.

        Generation ends early once every row has produced one of `stop_tokens`; a row that stopped first is padded
        with its stop token. `seed` makes sampling reproducible without touching the global RNG. `compile` runs the
        decode step under torch.compile (one compile per batch size and cache length, which costs seconds on CPU;
        it pays off over long or repeated generations).

        With a `draft_model` (a smaller model of the same vocabulary, e.g. shallower or with shared layers), decoding
        is speculative: the draft proposes `num_draft_tokens` tokens, the target checks them in one forward and keeps
        those the rejection rule accepts, so the output follows the target's distribution exactly (greedy: the same
        tokens as the target alone). A `SpeculativeStats` passed as `stats` counts the drafted and accepted tokens.
        """
        sampling = (max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, compile)
        new = list(stream(self, input_ids, *sampling, draft_model, num_draft_tokens, stats))
        return torch.cat([input_ids, *(token[:, None] for token in new)], dim=1)

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: list[list[int] | torch.Tensor],
        max_new_tokens: int | list[int],
        temperature: float | list[float] = 1.0,
        top_k: int | None | list[int | None] = None,
        top_p: float | None | list[float | None] = None,
        stop_tokens: list[int] | list[list[int]] | None = None,
        seed: int | None | list[int | None] = None,
        compile: bool = False,
        draft_model: MiniGrok | None = None,
        num_draft_tokens: int = 4,
        stats: SpeculativeStats | None = None,
    ) -> list[list[int]]:
        """The new tokens of each prompt, prompts of any lengths generated in one batch, each row as it would alone.

        Every argument but `prompts` is one value for all rows or a list of one per row (`stop_tokens`: a list of
        ids for all, or a list of such lists). A row ends after its first stop token (kept) or its max_new_tokens.
        `seed` an int seeds row i with seed + i; a row's draws depend only on its seed, not on the other rows.
        `draft_model`, `num_draft_tokens` and `stats`: speculative decoding, as in `generate`.
        """
        sampling = (max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, compile)
        return generate_batch(self, prompts, *sampling, draft_model, num_draft_tokens, stats)

    # -- persistence and reporting ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (tied and shared tensors once), each atomically."""
        from .checkpoint import save_model

        save_model(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu", verify: bool = True
    ) -> MiniGrok:
        """Rebuild a model saved by save_pretrained, every tensor checked against config.json before anything is
        allocated, and the weights' sha256 against the manifest unless verify=False."""
        from .checkpoint import load_model

        return load_model(directory, map_location, verify)

    def report(self, context: int | None = None):
        """Parameter counts, FLOPs per token at `context` (default max_seq_len), KV-cache and checkpoint bytes."""
        from .report import model_report

        return model_report(self.config, context)

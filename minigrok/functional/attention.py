"""Scaled dot-product attention with native GQA/MQA, causal and sliding-window masks."""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from ._dispatch import use_triton


def _check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q, k, v as [B, H, T, D]; got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"attention needs k and v of one shape; got k{tuple(k.shape)} and v{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"attention needs q, k, v of one dtype on one device; got {q.dtype}, {k.dtype}, {v.dtype} on "
            f"{q.device}, {k.device}, {v.device}: cast and move them with .to(q)"
        )
    (batch, n_q_heads, q_len, head_dim), (_, n_kv_heads, kv_len, _) = q.shape, k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"attention: q{tuple(q.shape)} and k{tuple(k.shape)} disagree on batch or head dim")
    if n_q_heads % n_kv_heads:
        raise ValueError(f"attention: q has {n_q_heads} heads, not a multiple of the {n_kv_heads} heads of k/v")
    if q_len > kv_len:
        raise ValueError(f"attention: q length {q_len} exceeds k/v length {kv_len}; queries align to the last keys")
    if window is not None and window < 1:
        raise ValueError(f"attention: window={window} must be >= 1 (or None for no window)")


def attention_mask(
    q_len: int, kv_len: int, causal: bool, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [q_len, kv_len] mask (True = visible), or None when every key is visible.

    Query i sits at position i + kv_len - q_len (queries align to the last keys, as after a KV cache).
    """
    if not causal and window is None:
        return None
    query_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    key_pos = torch.arange(kv_len, device=device)[None, :]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        visible &= key_pos <= query_pos
    if window is not None:
        visible &= (query_pos - key_pos).abs() < window
    return visible


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    backend: str = "auto",
    allow_tf32: bool = True,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], query head h reading kv head h // (Hq // Hkv).

    `causal` masks future keys; `window` keeps only keys within `window` positions of the query. On Triton a single
    query that needs no gradient (a decode step) takes the split-KV decode kernel, anything else FlashAttention,
    whose fp32 dots use TF32 tensor cores unless `allow_tf32=False` (exact fp32; the decode kernel is always exact,
    the PyTorch path follows torch.backends).

    `key_lengths` [B] replaces `causal` for a static KV cache whose rows hold different lengths: row b's Tq queries
    are its tokens key_lengths[b] - Tq .. key_lengths[b] - 1, each seeing the row's keys up to its own position (and
    within `window`); keys past a row's length are never seen. The Tk slots are a ring: position p sits in slot
    p % Tk, each slot holding the last position written there, so a row longer than Tk keeps its last Tk keys (a
    windowed layer's bounded cache). A single query takes the decode kernel on Triton.
    """
    _check_attention_args(q, k, v, window)
    triton = use_triton(backend, q)
    decode_step = q.shape[2] == 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    if triton and decode_step:
        from minigrok.kernels.decode_attention import decode_attention
    if key_lengths is not None:
        if key_lengths.shape != (q.shape[0],) or key_lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"attention: key_lengths must be integer [B] = [{q.shape[0]}]; got {key_lengths.dtype} "
                f"{tuple(key_lengths.shape)}"
            )
        if triton and decode_step:
            return decode_attention(q, k, v, scale=scale, key_lengths=key_lengths, window=window)
        return masked_attention(q, k, v, key_lengths, scale, window)
    if triton:
        if decode_step:
            # One query after the last key (a decode step) sees every key, or with a window only the last `window`.
            if window is not None:
                k, v = k[:, :, -window:], v[:, :, -window:]
            return decode_attention(q, k, v, scale=scale)
        from minigrok.kernels.attention import flash_attention

        return flash_attention(q, k, v, causal=causal, scale=scale, window=window, allow_tf32=allow_tf32)
    q_len, kv_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    causal = causal and q_len > 1  # a single query at the end of the keys sees all of them
    window = window if window is not None and window < kv_len else None
    if causal and window is None and q_len == kv_len:
        # SDPA's own causal path never builds a mask tensor.
        return scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(q_len, kv_len, causal, window, q.device)
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def ring_positions(key_lengths: torch.Tensor, slots: int) -> torch.Tensor:
    """[B, slots]: the position each slot of a ring of `slots` holds in a row of key_lengths[b] tokens, the last
    p < key_lengths[b] with p % slots == slot (negative: never written). Below `slots` tokens, slot s holds s."""
    last = key_lengths[:, None] - 1
    return last - (last - torch.arange(slots, device=key_lengths.device)) % slots


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of a few queries per row over a static KV cache (a ring, see `attention`) whose rows hold
    key_lengths [B] keys. Each GQA group's query heads are folded into the query axis, so every K/V head is read
    once by all the queries that share it and never repeated."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    query_positions = key_lengths[:, None] - q_len + torch.arange(q_len, device=q.device)  # [B, Tq]
    distance = query_positions[:, :, None] - ring_positions(key_lengths, kv_len)[:, None, :]  # [B, Tq, Tk]
    mask = (distance >= 0) & (distance <= query_positions[:, :, None])  # not in the future, written
    if window is not None:
        mask &= distance < window
    folded = q.reshape(batch, n_kv_heads, group * q_len, head_dim)  # query head h = kv head * group + g
    mask = mask[:, None, None].expand(batch, 1, group, q_len, kv_len).reshape(batch, 1, group * q_len, kv_len)
    out = scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, n_heads, q_len, head_dim)

"""Split-KV (flash-decoding) attention in Triton for one query token against a KV cache; inference only.

A decode step has one query row per head, so one program per (batch, query head) leaves most of a GPU idle and reads
each K/V head once per query head. Here a program takes the query heads of one GQA group as the rows of one tile
(padded to 16), reads its K/V head once for all of them, and covers one chunk of the keys; a second small kernel
merges the chunks' partial outputs by their log-sum-exp. Nothing here is differentiated, so there is no autograd
Function: minigrok.functional.attention sends a single query to this kernel only when no gradient is wanted.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import check_dtype, load_tile, row_settings
from .attention import online_softmax_step

_LOG2E = 1.0 / math.log(2.0)
# Enough programs to fill about twice the SMs of the GPU at hand; without one (the interpreter), those of an H100.
PROGRAMS_PER_SM = 2
DEFAULT_SMS = 132
# The merge holds [splits, head dim] fp32 partials of one head in registers, so the number of splits is capped.
MAX_SPLITS = 128
KEY_TILE_BYTES = 16384  # one [BLOCK_N, BLOCK_D] tile of K (and one of V) per pipeline stage in shared memory


@triton.jit
def _decode_split_kernel(
    Q, K, V, Part, PartLSE, KeyLengths,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_pb, stride_ph, stride_ps, stride_pd,
    n_kv_heads, group_size, T_K, HEAD_DIM, chunk_len, qk_scale, window,
    DOT_PRECISION: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b, kv_h = bkv // n_kv_heads, bkv % n_kv_heads
    kv_len = T_K
    length = T_K
    if HAS_KEY_LENGTHS:  # row b sees its first KeyLengths[b] keys (a static cache whose rows hold different lengths)
        length = tl.load(KeyLengths + b).to(tl.int32)
        kv_len = tl.minimum(length, T_K)
    first_head = kv_h * group_size  # rows: the query heads h = first_head + row that read K/V head kv_h
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)

    q_base = Q + b * stride_qb + first_head * stride_qh
    q = load_tile(q_base, rows, stride_qh, group_size, dims, stride_qd, HEAD_DIM)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    # Online softmax in base 2 over this split's keys. A split past its row's length sees none (l_i stays 0): it
    # stores a zero partial of log-sum-exp -inf, which the merge weighs 0.
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    lo = split * chunk_len  # chunk_len is a multiple of BLOCK_N, so only the cache's end needs a mask
    for start_n in range(lo, tl.minimum(lo + chunk_len, kv_len), BLOCK_N):
        keys = start_n + cols
        k_t = load_tile(k_base, dims, stride_kd, HEAD_DIM, keys, stride_kt, kv_len)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        visible = keys < kv_len
        if HAS_WINDOW:  # a ring of T_K slots: slot s holds the last position p < length with p % T_K == s
            visible = visible & ((length - 1 - keys) % T_K < window)
        qk = tl.where(visible[None, :], qk, float("-inf"))
        v = load_tile(v_base, keys, stride_vt, kv_len, dims, stride_vd, HEAD_DIM)
        if HAS_WINDOW:  # slots outside the window may hold anything: a weight of 0 must not meet a NaN
            v = tl.where(visible[:, None], v, 0.0)
        m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, DOT_PRECISION)

    heads = first_head + rows
    part = Part + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + dims[None, :] * stride_pd
    mask = (rows[:, None] < group_size) & (dims[None, :] < HEAD_DIM)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    tl.store(part, (acc / l_safe[:, None]).to(Part.dtype.element_ty), mask=mask)
    lse_rows = (b * n_kv_heads * group_size + heads) * tl.num_programs(0) + split
    tl.store(PartLSE + lse_rows, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")), mask=rows < group_size)


@triton.jit
def _merge_splits_kernel(
    Part, PartLSE, Out,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_ob, stride_oh, stride_od,
    n_heads, n_splits, HEAD_DIM,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    # Each split's output is normalised over its own keys: weigh it by its share of the total exp-sum.
    lse = tl.load(PartLSE + bh * n_splits + splits, mask=splits < n_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    part_base = Part + b * stride_pb + h * stride_ph
    part = load_tile(part_base, splits, stride_ps, n_splits, dims, stride_pd, HEAD_DIM)
    out = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
    out_ptrs = Out + b * stride_ob + h * stride_oh + dims * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=dims < HEAD_DIM)


def num_splits(kv_rows: int, kv_len: int, block_n: int, target_programs: int) -> tuple[int, int]:
    """(splits, chunk length) for `kv_rows` = batch * KV heads programs per split over `kv_len` cached keys.

    Enough splits that kv_rows * splits reaches target_programs, but no more than one per block of keys (a split
    has a fixed cost: its query load and partial store) nor MAX_SPLITS; chunks are whole blocks, and rounding them up
    can only drop splits, never leave one empty.
    """
    blocks = triton.cdiv(kv_len, block_n)
    splits = min(triton.cdiv(target_programs, kv_rows), blocks, MAX_SPLITS)
    chunk = triton.cdiv(blocks, splits) * block_n
    return triton.cdiv(kv_len, chunk), chunk


@functools.cache
def _target_programs(device: torch.device) -> int:
    """How many programs a launch should bring to keep `device` busy: PROGRAMS_PER_SM per SM, measured once."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS
    return PROGRAMS_PER_SM * sms


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query q [B, Hq, 1, D] over the keys of k, v [B, Hkv, Tk, D]; no autograd.

    Every key, or with `key_lengths` [B] (each >= 1) row b's first key_lengths[b] keys only: a static KV cache.
    With `window`, the Tk slots are a ring (position p in slot p % Tk) and the query, at position key_lengths[b] - 1
    (Tk - 1 without key_lengths), sees the `window` positions ending at its own.
    Any strides (a slice of a preallocated cache is read in place); query head h reads K/V head h // (Hq // Hkv).
    """
    assert q.dim() == k.dim() == 4 and k.shape == v.shape and q.shape[2] == 1, "decode_attention: shapes"
    assert q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3] and q.shape[1] % k.shape[1] == 0
    assert key_lengths is None or key_lengths.shape == (q.shape[0],), "decode_attention: key_lengths [B]"
    check_dtype("decode_attention", q, k, v)
    batch, n_heads, _, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    if not 16 <= head_dim <= 256:
        raise ValueError(f"decode_attention: head_dim={head_dim} is not supported; use a head_dim in [16, 256]")
    group_size = n_heads // n_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = max(16, min(64, KEY_TILE_BYTES // (block_d * q.element_size())))
    splits, chunk = num_splits(batch * n_kv_heads, kv_len, block_n, _target_programs(q.device))
    out = torch.empty_like(q)
    # With one split the partial is the answer: write it straight to `out` and skip the merge.
    part = out if splits == 1 else torch.empty(batch, n_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
    qk_scale = (1.0 / math.sqrt(head_dim) if scale is None else float(scale)) * _LOG2E
    # fp32 dots run on FMA units, the product in registers: 4 warps spill on sm_90 at head dim 128, 8 do not.
    num_warps = 8 if q.dtype == torch.float32 else 4
    _decode_split_kernel[(splits, batch * n_kv_heads)](
        q, k, v, part, part_lse, part_lse if key_lengths is None else key_lengths,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *part.stride(),
        n_kv_heads, group_size, kv_len, head_dim, chunk, qk_scale, 0 if window is None else window,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact
        HAS_KEY_LENGTHS=key_lengths is not None, HAS_WINDOW=window is not None,
        BLOCK_H=max(16, triton.next_power_of_2(group_size)), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        block_s = triton.next_power_of_2(splits)
        _merge_splits_kernel[(batch * n_heads,)](
            part, part_lse, out, *part.stride(), out.stride(0), out.stride(1), out.stride(3),
            n_heads, splits, head_dim, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=row_settings(block_s * block_d)[1],
        )  # fmt: skip
    return out

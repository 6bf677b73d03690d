"""FlashAttention-2 in Triton: fused causal / sliding-window attention with native GQA/MQA, forward and backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_dtype, load_tile, store_tile

_LN2 = math.log(2.0)
_LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class _Tile:
    """An autotune candidate, and the widest head block it compiles for without register spills on sm_8x / sm_9x,
    for 2-byte (bf16, fp16) and for fp32 inputs; 0 where it spills even at the narrowest head block."""

    block_m: int  # query rows
    block_n: int  # key rows
    num_warps: int
    num_stages: int
    max_head_sm8x: int
    max_head_sm9x: int
    max_head_fp32_sm8x: int
    max_head_fp32_sm9x: int
    last_resort: bool = False  # launched only when no other tile fits shared memory (e.g. fp32 at 256 on sm_80)

    def max_head(self, major: int, elem: int) -> int:
        """The widest head block without spills on a GPU of compute capability `major` for `elem`-byte inputs."""
        if elem == 4:
            return self.max_head_fp32_sm9x if major >= 9 else self.max_head_fp32_sm8x
        return self.max_head_sm9x if major >= 9 else self.max_head_sm8x


# Per kernel, widest first; the limits were measured with tests/kernels/test_gpu_compile.py, which compiles each
# tile for sm_80 and sm_90 and checks them. fp32 tiles hold twice the bytes, so they stop at narrower head blocks.
_FWD_TILES = (
    _Tile(128, 64, 8, 3, 128, 128, 128, 256),
    _Tile(64, 64, 4, 3, 128, 128, 0, 128),
    _Tile(64, 32, 4, 2, 256, 256, 128, 256),
    _Tile(32, 64, 4, 3, 0, 256, 0, 256),
    _Tile(32, 32, 4, 2, 256, 256, 256, 256),
    _Tile(32, 16, 4, 2, 0, 0, 0, 0, last_resort=True),
)
# dQ holds one more [BLOCK_M, BLOCK_N] tile than the forward pass, so its tiles stop at narrower head blocks.
_DQ_TILES = (
    _Tile(128, 64, 8, 3, 64, 128, 32, 128),
    _Tile(64, 64, 4, 3, 128, 128, 32, 128),
    _Tile(64, 32, 4, 2, 256, 256, 128, 128),
    _Tile(32, 64, 4, 3, 256, 64, 16, 16),
    _Tile(32, 32, 4, 2, 256, 256, 256, 256),
    _Tile(32, 16, 4, 2, 0, 0, 0, 0, last_resort=True),
)
# dK/dV hold two fp32 accumulators and the K and V tiles for the whole loop, so they take fewer, narrower tiles.
_DKDV_TILES = (
    _Tile(64, 128, 8, 1, 32, 128, 16, 64),
    _Tile(32, 64, 4, 2, 64, 64, 32, 64),
    _Tile(64, 32, 8, 1, 64, 64, 256, 64),
    _Tile(32, 32, 4, 1, 256, 256, 16, 0),
    _Tile(16, 32, 4, 1, 0, 0, 0, 0, last_resort=True),
)


def _shared_memory(tile: _Tile, block_d: int, elem: int, rows_once: int, rows_per_step: int) -> int:
    """Upper bound on one program's shared memory in bytes: the tiles loaded once, num_stages copies (at least two)
    of those loaded each step, one [BLOCK_M, BLOCK_N] tile staged between two dots, and the pipelined fp32 row
    statistics (LSE, delta). tests/kernels/test_gpu_compile.py checks it against the compiler on sm_80 and sm_90:
    never below, and never so far above that a config which fits is dropped."""
    copies = max(tile.num_stages, 2)
    tiles = block_d * (rows_once + copies * rows_per_step) + tile.block_m * tile.block_n
    return elem * tiles + 8 * tile.block_m * copies


def _autotune(tiles: tuple[_Tile, ...], rows: Callable[[int, int], tuple[int, int]]):
    """Autotune over `tiles`, keeping only those that fit this GPU's shared memory and do not spill at this head dim.

    `rows(BLOCK_M, BLOCK_N)` gives the rows of [*, BLOCK_D] tiles the kernel loads once and at each step. The key
    buckets the lengths to powers of two, so a new prompt length reuses the choice made for its bucket.
    """
    by_config = {(t.block_m, t.block_n, t.num_warps, t.num_stages): t for t in tiles}

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        q, block_d = named_args["Q"], kwargs["BLOCK_D"]
        props = torch.cuda.get_device_properties(q.device)
        kept, fitting, last_resort = [], [], []
        for config in configs:
            tile = by_config[(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)]
            shared = _shared_memory(tile, block_d, q.element_size(), *rows(tile.block_m, tile.block_n))
            if shared <= props.shared_memory_per_block_optin:
                (last_resort if tile.last_resort else fitting).append(config)
                if block_d <= tile.max_head(props.major, q.element_size()):
                    kept.append(config)
        # Past every tile's spill-free head block (head dims over 128 only), the narrowest tile that fits still runs.
        return kept or fitting[-1:] or last_resort

    if INTERPRET:  # the CPU interpreter cannot benchmark, so it gets exactly one config
        configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    else:
        configs = [
            triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps, num_stages=t.num_stages)
            for t in tiles
        ]
    key = ["T_Q_BUCKET", "T_K_BUCKET", "BLOCK_D", "CAUSAL", "DOT_PRECISION"]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


@triton.jit
def _visible(q_pos, k_pos, T_K, window, CAUSAL: tl.constexpr):
    """Key k_pos is visible to query q_pos: in range, not in the future (causal), and closer than `window`."""
    dist = q_pos - k_pos
    visible = (k_pos < T_K) & (dist < window)
    if CAUSAL:
        visible = visible & (dist >= 0)
    else:
        visible = visible & (dist > -window)
    return visible


@triton.jit
def _key_range(first_pos, T_K, window, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys any query at positions first_pos .. first_pos + BLOCK_M - 1 can see; lo is block aligned."""
    lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    last_pos = first_pos + BLOCK_M - 1
    if CAUSAL:
        hi = tl.minimum(last_pos + 1, T_K)
    else:
        hi = tl.minimum(last_pos + window, T_K)
    return lo, hi


@triton.jit
def _query_range(first_key, offset, T_Q, window, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the query rows that can see any key in first_key .. first_key + BLOCK_N - 1; lo is block aligned."""
    if CAUSAL:
        first_pos = first_key
    else:
        first_pos = first_key - window + 1
    lo = tl.maximum(first_pos - offset, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(first_key + BLOCK_N - 1 + window - offset, T_Q)
    return lo, hi


@triton.jit
def _keys_seen_by_all(first_pos, T_K, window, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """[lo, hi) of the keys every query at first_pos .. first_pos + BLOCK_M - 1 sees: a key block inside it needs
    no mask. Causal attention masks only the diagonal blocks (and a window's edge), so most blocks skip the mask."""
    lo = tl.maximum(first_pos + BLOCK_M - window, 0)
    if CAUSAL:
        hi = tl.minimum(first_pos + 1, T_K)
    else:
        hi = tl.minimum(first_pos + window, T_K)
    return lo, hi


@triton.jit
def online_softmax_step(qk, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one block of base-2 scores qk and its values v into the running max m_i, sum l_i and output acc."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    # P in V's dtype: on a GPU a native half-precision dot, accumulating in fp32.
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@_autotune(_FWD_TILES, lambda m, n: (m, 2 * n))  # Q once; K, V each step
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    n_heads, group_size, T_Q, T_K, HEAD_DIM, qk_scale, window, T_Q_BUCKET, T_K_BUCKET,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    kv_h = h // group_size  # GQA: each run of `group_size` query heads reads one K/V head, never copied
    offset = T_K - T_Q  # queries are the last T_Q positions
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)

    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qt, T_Q, dims, stride_qd, HEAD_DIM)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    # Online softmax in base 2: qk_scale already holds log2(e), so exp2 replaces exp. The running max starts
    # finite so a row whose first key blocks are all masked (sliding window) gives exp2(-inf) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m * BLOCK_M + offset, T_K, window, CAUSAL, BLOCK_M, BLOCK_N)
    all_lo, all_hi = _keys_seen_by_all(start_m * BLOCK_M + offset, T_K, window, CAUSAL, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + cols
        k_t = load_tile(k_base, dims, stride_kd, HEAD_DIM, keys, stride_kt, T_K)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if (start_n < all_lo) | (start_n + BLOCK_N > all_hi):
            qk = tl.where(_visible(rows[:, None] + offset, keys[None, :], T_K, window, CAUSAL), qk, float("-inf"))
        v = load_tile(v_base, keys, stride_vt, T_K, dims, stride_vd, HEAD_DIM)
        m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, DOT_PRECISION)

    # Rows past T_Q may see no key at all; they are never stored, so guard only against dividing by zero.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    store_tile(
        Out + b * stride_ob + h * stride_oh, acc / l_safe[:, None], rows, stride_ot, T_Q, dims, stride_od, HEAD_DIM
    )
    tl.store(LSE + bh * T_Q + rows, m_i + tl.log2(l_safe), mask=rows < T_Q)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    n_heads, T_Q, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    o = load_tile(Out + b * stride_ob + h * stride_oh, rows, stride_ot, T_Q, dims, stride_od, HEAD_DIM)
    do = load_tile(DO + b * stride_dob + h * stride_doh, rows, stride_dot, T_Q, dims, stride_dod, HEAD_DIM)
    tl.store(DELTA + bh * T_Q + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T_Q)


@_autotune(_DKDV_TILES, lambda m, n: (2 * n, 2 * m))  # K, V once; Q, dO each step
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    n_kv_heads, group_size, T_Q, T_K, HEAD_DIM, sm_scale, qk_scale, window, T_Q_BUCKET, T_K_BUCKET,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, kv_h = bh // n_kv_heads, bh % n_kv_heads
    offset = T_K - T_Q
    keys = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)

    k = load_tile(K + b * stride_kb + kv_h * stride_kh, keys, stride_kt, T_K, dims, stride_kd, HEAD_DIM)
    v = load_tile(V + b * stride_vb + kv_h * stride_vh, keys, stride_vt, T_K, dims, stride_vd, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi = _query_range(start_n * BLOCK_N, offset, T_Q, window, CAUSAL, BLOCK_M, BLOCK_N)
    # This program owns its K/V block and sums over every query head of its GQA group in a fixed order:
    # no atomics, so gradients are bitwise reproducible. Rows past T_Q load q = dO = 0 and add nothing.
    for g in range(group_size):
        h = kv_h * group_size + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * n_kv_heads * group_size + h) * T_Q
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = load_tile(q_base, rows, stride_qt, T_Q, dims, stride_qd, HEAD_DIM)
            do = load_tile(do_base, rows, stride_dot, T_Q, dims, stride_dod, HEAD_DIM)
            lse = tl.load(LSE + row_base + rows, mask=rows < T_Q, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=rows < T_Q, other=0.0)
            # Work transposed ([keys, queries]) so that dK and dV accumulate without transposing P.
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            # Masked in every block: skipping the mask off the diagonal, as the other two kernels do, costs this
            # kernel's loop the registers it lacks (spills at 32x64 tiles on sm_80).
            qk_t = tl.where(_visible(rows[None, :] + offset, keys[:, None], T_K, window, CAUSAL), qk_t, float("-inf"))
            p_t = tl.exp2(qk_t - lse[None, :])
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    store_tile(
        DK + b * stride_dkb + kv_h * stride_dkh, dk * sm_scale, keys, stride_dkt, T_K, dims, stride_dkd, HEAD_DIM
    )
    store_tile(DV + b * stride_dvb + kv_h * stride_dvh, dv, keys, stride_dvt, T_K, dims, stride_dvd, HEAD_DIM)


@_autotune(_DQ_TILES, lambda m, n: (2 * m, 2 * n))  # Q, dO once; K, V each step
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    n_heads, group_size, T_Q, T_K, HEAD_DIM, sm_scale, qk_scale, window, T_Q_BUCKET, T_K_BUCKET,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    kv_h = h // group_size
    offset = T_K - T_Q
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)

    q = load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qt, T_Q, dims, stride_qd, HEAD_DIM)
    do = load_tile(DO + b * stride_dob + h * stride_doh, rows, stride_dot, T_Q, dims, stride_dod, HEAD_DIM)
    lse = tl.load(LSE + bh * T_Q + rows, mask=rows < T_Q, other=0.0)
    delta = tl.load(DELTA + bh * T_Q + rows, mask=rows < T_Q, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m * BLOCK_M + offset, T_K, window, CAUSAL, BLOCK_M, BLOCK_N)
    all_lo, all_hi = _keys_seen_by_all(start_m * BLOCK_M + offset, T_K, window, CAUSAL, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + cols
        k = load_tile(k_base, keys, stride_kt, T_K, dims, stride_kd, HEAD_DIM)
        v = load_tile(v_base, keys, stride_vt, T_K, dims, stride_vd, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if (start_n < all_lo) | (start_n + BLOCK_N > all_hi):
            qk = tl.where(_visible(rows[:, None] + offset, keys[None, :], T_K, window, CAUSAL), qk, float("-inf"))
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    store_tile(DQ + b * stride_dqb + h * stride_dqh, dq * sm_scale, rows, stride_dqt, T_Q, dims, stride_dqd, HEAD_DIM)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The kernel's own limits (dtypes, head dims); minigrok.functional.attention checks the arguments themselves."""
    assert q.dim() == k.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0], "flash_attention: shapes"
    assert q.shape[3] == k.shape[3] and q.shape[1] % k.shape[1] == 0 and q.device == k.device == v.device
    check_dtype("flash_attention", q, k, v)
    head_dim = q.shape[-1]
    if not 16 <= head_dim <= 256 or head_dim % 2:
        raise ValueError(f"flash_attention: head_dim={head_dim} is not supported; use an even head_dim in [16, 256]")


def _softmax_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _kernel_args(
    q: torch.Tensor, kv_len: int, causal: bool, scale: float | None, window: int | None, allow_tf32: bool
) -> dict:
    """Scalar and constexpr arguments shared by the forward and backward launches."""
    head_dim = q.shape[-1]
    return {
        # Read by the autotuner's key only.
        "T_Q_BUCKET": triton.next_power_of_2(q.shape[2]),
        "T_K_BUCKET": triton.next_power_of_2(kv_len),
        "qk_scale": _softmax_scale(q, scale) * _LOG2E,  # scores go straight to base 2
        "window": kv_len if window is None else window,  # no window == one as wide as the keys
        "HEAD_DIM": head_dim,
        "CAUSAL": causal,
        # Read only for fp32 tiles (half ones always run native MMA): tf32 tensor cores, or full-precision FMA.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 and not allow_tf32 else "tf32",
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
    }


def _attention_forward(q, k, v, causal, scale, window, allow_tf32, out=None):
    """Launch the forward kernel; returns (out, lse) with lse in base 2."""
    _check_inputs(q, k, v)
    batch, n_heads, q_len, _ = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must match q: got {tuple(out.shape)} {out.dtype} {out.device}, want {tuple(q.shape)} {q.dtype} {q.device}"
        )
    lse = torch.empty(batch, n_heads, q_len, dtype=torch.float32, device=q.device)
    args = _kernel_args(q, kv_len, causal, scale, window, allow_tf32)
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        n_heads, n_heads // n_kv_heads, q_len, kv_len, **args,
    )  # fmt: skip
    return out, lse


def _attention_backward(do, q, k, v, out, lse, causal, scale, window, allow_tf32):
    """Launch the three backward kernels; returns (dq, dk, dv) in the input dtype."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    args = _kernel_args(q, kv_len, causal, scale, window, allow_tf32)
    sm_scale = _softmax_scale(q, scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    delta = torch.empty_like(lse)
    block_m = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(q_len, block_m), batch * n_heads)](
        out, do, delta, *out.stride(), *do.stride(), n_heads, q_len, head_dim,
        BLOCK_M=block_m, BLOCK_D=args["BLOCK_D"],
    )  # fmt: skip

    grid_kv = lambda meta: (triton.cdiv(kv_len, meta["BLOCK_N"]), batch * n_kv_heads)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        n_kv_heads, n_heads // n_kv_heads, q_len, kv_len, sm_scale=sm_scale, **args,
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        n_heads, n_heads // n_kv_heads, q_len, kv_len, sm_scale=sm_scale, **args,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the base-2 LSE; backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, allow_tf32):
        out, lse = _attention_forward(q, k, v, causal, scale, window, allow_tf32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.window, ctx.allow_tf32 = causal, scale, window, allow_tf32
        return out

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = _attention_backward(do, *ctx.saved_tensors, ctx.causal, ctx.scale, ctx.window, ctx.allow_tf32)
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    allow_tf32: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D]; differentiable.

    Query i sits at position i + Tk - Tq; query head h reads K/V head h // (Hq // Hkv). fp32 inputs multiply on
    tf32 tensor cores unless `allow_tf32=False` asks for full fp32 products (slower); half inputs ignore it.
    """
    return FlashAttentionFunction.apply(q, k, v, causal, scale, window, allow_tf32)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    out: torch.Tensor | None = None,
    allow_tf32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only, no autograd: returns (out, lse), lse the natural-log log-sum-exp, fp32 [B, Hq, Tq].

    `out`, if given, is a buffer shaped and typed like q that receives the output; `allow_tf32` as in flash_attention.
    """
    out, lse = _attention_forward(q, k, v, causal, scale, window, allow_tf32, out)
    return out, lse * _LN2

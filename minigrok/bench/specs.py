"""What `minigrok bench kernels OP` sweeps: each op's cases (inputs, work per mode) and the providers that run them."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import functional

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    """One point of a sweep: the swept value x, the fixed shape, fresh inputs, and the work done per mode."""

    x: int
    shape: str
    make: Callable[[], tuple]  # inputs; those that want gradients have requires_grad set
    kwargs: dict = field(default_factory=dict)  # non-tensor arguments passed to every provider
    flops: dict[str, float] | None = None  # per "fwd" and "bwd"; fwd+bwd is their sum
    bytes: dict[str, float] | None = None


@dataclass
class KernelSpec:
    """One op's sweep: its cases, providers (name -> fn(*inputs, **case.kwargs)) and the baseline speed-ups refer to."""

    x_name: str
    cases: list[Case]
    providers: dict[str, Callable]
    baseline: str
    triton: tuple[str, ...]  # providers that launch Triton kernels: the interpreter on CPU
    modes: tuple[str, ...] = MODES


def kernel_spec(
    x_name: str,
    cases: list[Case],
    op: Callable,
    names: tuple[str, str] = ("triton", "torch"),
    others: dict[str, Callable] | None = None,
    baseline: str = "torch",
    modes: tuple[str, ...] = MODES,
) -> KernelSpec:
    """The sweep of a `functional` op timed with its Triton and its PyTorch backend (called `names`), and `others`."""
    ours = {
        name: functools.partial(op, backend=backend) for name, backend in zip(names, ("triton", "torch"), strict=True)
    }
    return KernelSpec(x_name, cases, ours | (others or {}), baseline, names[:1], modes)


def sweep_default(device: torch.device, quick: bool, tiny, gpu, cpu):
    """A sweep's default: `tiny` with --quick (tests), else sized for a GPU or for a CPU."""
    return tiny if quick else gpu if device.type == "cuda" else cpu


def random_inputs(
    device: torch.device,
    dtype: torch.dtype,
    *shapes: tuple[int, ...],
    scales: tuple[float, ...] = (),
    fixed: tuple = (),
) -> Callable[[], tuple]:
    """Factory of seeded random tensors of these shapes that want gradients (each times its scale, default 1),
    followed by the `fixed` inputs as they are."""

    def make() -> tuple:
        generator = torch.Generator(device=device).manual_seed(0)
        return tuple(
            (torch.randn(shape, generator=generator, device=device) * scale).to(dtype).requires_grad_()
            for shape, scale in itertools.zip_longest(shapes, scales, fillvalue=1.0)
        ) + tuple(fixed)

    return make


def hidden_sizes_and_rows(
    device: torch.device, quick: bool, sizes: list[int] | None, rows: int | None
) -> tuple[list[int], int]:
    """Swept hidden sizes and the fixed row count of the memory-bound ops (RMSNorm, RoPE, SwiGLU)."""
    sizes = sizes or sweep_default(device, quick, [64, 128], [1024, 2048, 4096, 8192, 16384], [256, 512, 1024])
    return sizes, rows or sweep_default(device, quick, 16, 4096, 256)


def hidden_sweep(
    op: Callable,
    device: torch.device,
    dtype: torch.dtype,
    quick: bool,
    sizes: list[int] | None,
    rows: int | None,
    shapes: Callable[[int, int], list[tuple[int, ...]]],
    vectors_moved: Callable[[int], tuple[int, int]],
) -> KernelSpec:
    """A memory-bound op over hidden size at a fixed row count: inputs of `shapes(rows, hidden)`, and
    `vectors_moved(rows)` hidden-wide vectors read or written by the forward and by the backward."""
    sizes, rows = hidden_sizes_and_rows(device, quick, sizes, rows)
    fwd, bwd = vectors_moved(rows)
    cases = [
        Case(
            hidden,
            f"rows={rows}",
            random_inputs(device, dtype, *shapes(rows, hidden)),
            bytes={"fwd": fwd * hidden * dtype.itemsize, "bwd": bwd * hidden * dtype.itemsize},
        )
        for hidden in sizes
    ]
    return kernel_spec("hidden", cases, op)


def rms_norm_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    rows: int | None = None,
) -> KernelSpec:
    """RMSNorm of [rows, hidden] over hidden size."""
    # forward reads x, w and writes y; backward reads x, w, dy and writes dx, dw
    shapes, moved = lambda rows, hidden: [(rows, hidden), (hidden,)], lambda rows: (2 * rows + 1, 3 * rows + 2)
    return hidden_sweep(functional.rms_norm, device, dtype, quick, sizes, rows, shapes, moved)


def swiglu_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    rows: int | None = None,
) -> KernelSpec:
    """silu(gate) * up on [rows, hidden] over hidden size."""
    # forward reads gate, up and writes out; backward reads gate, up, dout and writes dgate, dup
    shapes, moved = lambda rows, hidden: [(rows, hidden)] * 2, lambda rows: (3 * rows, 5 * rows)
    return hidden_sweep(functional.swiglu, device, dtype, quick, sizes, rows, shapes, moved)


def rope_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    rows: int | None = None,
) -> KernelSpec:
    """RoPE on q [1, hidden / D, T, D] and k with a quarter of the heads, over hidden size, T = rows."""
    sizes, rows = hidden_sizes_and_rows(device, quick, sizes, rows)
    head_dim = sweep_default(device, quick, 16, 128, 64)
    if bad := [hidden for hidden in sizes if hidden % head_dim]:
        raise ValueError(f"rope: hidden sizes {bad} are not multiples of the head dim {head_dim}")
    cos, sin = functional.rope_cos_sin(torch.arange(rows, device=device), head_dim)
    table_bytes = 2 * cos.numel() * cos.element_size()
    cases = []
    for hidden in sizes:
        q_heads = hidden // head_dim
        kv_heads = max(1, q_heads // 4)
        qk_bytes = rows * (q_heads + kv_heads) * head_dim * dtype.itemsize
        # both directions read q, k (or their gradients) and the cos/sin tables, and write as much
        traffic = 2 * qk_bytes + table_bytes
        shapes = (1, q_heads, rows, head_dim), (1, kv_heads, rows, head_dim)
        make = random_inputs(device, dtype, *shapes, fixed=(cos, sin))
        cases.append(Case(hidden, f"T={rows} D={head_dim} Hkv=Hq/4", make, bytes={"fwd": traffic, "bwd": traffic}))
    return kernel_spec("hidden", cases, functional.apply_rope)


def naive_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused baseline: every fp32 logit at once."""
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def linear_cross_entropy_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    rows: int | None = None,
    hidden: int | None = None,
) -> KernelSpec:
    """Fused projection + cross-entropy of [rows, hidden] tokens over vocabulary size; time and peak memory."""
    sizes = sizes or sweep_default(device, quick, [64, 128], [8192, 16384, 32768, 65536, 131072], [1024, 4096, 8192])
    rows = rows or sweep_default(device, quick, 32, 8192, 512)
    hidden = hidden or sweep_default(device, quick, 16, 2048, 256)
    cases = []
    for vocab in sizes:
        targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0)).to(device)
        make = random_inputs(
            device, dtype, (rows, hidden), (vocab, hidden), scales=(1.0, hidden**-0.5), fixed=(targets,)
        )
        flops = {"fwd": 2 * rows * vocab * hidden, "bwd": 4 * rows * vocab * hidden}
        cases.append(Case(vocab, f"tokens={rows} hidden={hidden}", make, flops=flops))
    # The fused paths form the gradients during the forward, so a backward timed alone would mean nothing.
    return kernel_spec(
        "vocab",
        cases,
        functional.linear_cross_entropy,
        ("triton", "torch-chunked"),
        {"naive": naive_linear_cross_entropy},
        baseline="naive",
        modes=("fwd", "fwd+bwd"),
    )


def sdpa(backend) -> Callable:
    """scaled_dot_product_attention with one backend forced, so a row says which kernel it timed."""
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


def sdpa_providers() -> dict[str, Callable]:
    """scaled_dot_product_attention once per backend, named sdpa-<backend>."""
    from torch.nn.attention import SDPBackend

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return {f"sdpa-{name}": sdpa(backend) for name, backend in backends.items()}


def compiled_flex_attention() -> Callable:
    """flex_attention compiled once per shape, with its block mask cached per length."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Every shape of the sweep compiles once; the default recompile limit (8) would fall back to slow eager code.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    compiled = torch.compile(flex_attention, dynamic=False)

    @functools.cache
    def causal_mask(length: int, device: torch.device):
        return create_block_mask(lambda b, h, q, kv: q >= kv, None, None, length, length, device=device)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        mask = causal_mask(q.shape[2], q.device) if causal else None
        return compiled(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    return run


def check_gqa(gqa: list[int], n_heads: int) -> None:
    """Raise unless every query-per-KV-head ratio of --gqa divides the sweep's query heads."""
    if bad := [ratio for ratio in gqa if n_heads % ratio]:
        raise ValueError(f"--gqa {bad}: each query-per-KV-head ratio must divide the {n_heads} query heads")


def attention_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    head_dims: list[int] | None = None,
    causal: str = "both",
    gqa: list[int] | None = None,
) -> KernelSpec:
    """Attention over sequence length at a fixed number of tokens B*T, for each head dim, causal flag and GQA ratio."""
    gpu = device.type == "cuda"
    n_heads = 16 if gpu else 2
    sizes = sizes or sweep_default(device, quick, [32, 64], [512, 1024, 2048, 4096, 8192, 16384], [128, 256])
    head_dims = head_dims or sweep_default(device, quick, [16], [64, 128], [64])
    gqa = gqa or ([1, 4, 16] if gpu else [2])
    check_gqa(gqa, n_heads)
    tokens = 16384 if gpu else max(sizes)
    cases = []
    for head_dim, is_causal, ratio, seq_len in itertools.product(
        head_dims, {"both": [True, False], "on": [True], "off": [False]}[causal], gqa, sizes
    ):
        batch, kv_heads = max(1, tokens // seq_len), n_heads // ratio
        q_bytes, kv_bytes = (batch * heads * seq_len * head_dim * dtype.itemsize for heads in (n_heads, kv_heads))
        q_shape, kv_shape = (batch, n_heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim)
        fwd_flops = 4 * batch * n_heads * seq_len**2 * head_dim * (0.5 if is_causal else 1)
        cases.append(
            Case(
                seq_len,
                f"B*T={tokens} Hq={n_heads} Hkv={kv_heads} D={head_dim} {'causal' if is_causal else 'full'}",
                random_inputs(device, dtype, q_shape, kv_shape, kv_shape),
                {"causal": is_causal},
                flops={"fwd": fwd_flops, "bwd": 2.5 * fwd_flops},
                # forward reads q, k, v and writes o; backward reads those and do, and writes dq, dk, dv
                bytes={"fwd": 2 * q_bytes + 2 * kv_bytes, "bwd": 4 * q_bytes + 4 * kv_bytes},
            )
        )
    others = sdpa_providers()
    if gpu and importlib.util.find_spec("torch.nn.attention.flex_attention"):
        others["flex"] = compiled_flex_attention()
    baseline = "sdpa-math" if gpu else "ours-torch"
    return kernel_spec("seq_len", cases, functional.attention, ("ours-triton", "ours-torch"), others, baseline)


def decode_attention_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    head_dims: list[int] | None = None,
    gqa: list[int] | None = None,
) -> KernelSpec:
    """One decode step, a single query per head against a KV cache, over cache length; forward only (inference)."""
    gpu = device.type == "cuda"
    batch, n_heads = (8, 32) if gpu else (1, 8)
    sizes = sizes or sweep_default(device, quick, [17, 100], [512, 1024, 4096, 16384, 65536], [256, 1024, 4096])
    head_dims = head_dims or sweep_default(device, quick, [16], [64, 128], [64])
    gqa = gqa or ([1, 4, 8] if gpu else [4])
    check_gqa(gqa, n_heads)
    cases = []
    for head_dim, ratio, kv_len in itertools.product(head_dims, gqa, sizes):
        kv_heads = n_heads // ratio
        q_shape, kv_shape = (batch, n_heads, 1, head_dim), (batch, kv_heads, kv_len, head_dim)
        q_bytes, kv_bytes = (math.prod(shape) * dtype.itemsize for shape in (q_shape, kv_shape))
        cases.append(
            Case(
                kv_len,
                f"B={batch} Hq={n_heads} Hkv={kv_heads} D={head_dim}",
                random_inputs(device, dtype, q_shape, kv_shape, kv_shape),
                # The query sits after the last key, so it sees them all: SDPA's is_causal would align it to the first.
                {"causal": False},
                flops={"fwd": 4 * batch * n_heads * kv_len * head_dim},
                bytes={"fwd": 2 * q_bytes + 2 * kv_bytes},  # reads q, k, v and writes o
            )
        )
    baseline = "sdpa-math" if gpu else "ours-torch"
    return kernel_spec(
        "cache_len", cases, functional.attention, ("ours-triton", "ours-torch"), sdpa_providers(), baseline, ("fwd",)
    )


KERNEL_SPECS = {
    "attention": attention_spec,
    "decode_attention": decode_attention_spec,
    "rms_norm": rms_norm_spec,
    "rope": rope_spec,
    "swiglu": swiglu_spec,
    "linear_cross_entropy": linear_cross_entropy_spec,
}

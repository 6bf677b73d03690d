"""Benchmarks: training throughput and kernel microbenchmarks."""

from __future__ import annotations

import csv
import datetime
import functools
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import functional
from .machine import TORCH_DTYPES, autocast, matmul_peak_flops, resolve_dtype, synchronize


def _time_steps(step, n_steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n_steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _training_step(model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, dtype: str, device: torch.device):
    """One forward + backward + AdamW step, under bf16/fp16 autocast when asked (weights stay fp32)."""

    def step():
        with autocast(dtype, device):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train(
    config,
    batch_size: int,
    seq_len: int,
    dtype: str = "auto",
    steps: int = 10,
    warmup: int = 2,
    compare: tuple[str, ...] = (),
    device: str = "cpu",
    compile: bool = False,
) -> dict:
    """Training throughput (tokens/s), MFU and peak memory of a MiniGrok step on random tokens, timed interleaved
    in this process with each baseline named in `compare`:

    "hf": transformers' LlamaForCausalLM of the same shape, batch and dtype (and, when `dtype` is not fp32, also in
    fp32 as `hf_fp32_*`, the baseline of a mixed-precision win); "naive-loss": our model with full logits and
    F.cross_entropy instead of the chunked linear cross-entropy. All use fused AdamW (the default of transformers'
    Trainer); `compile` wraps every model in torch.compile. `dtype="auto"` runs in the dtype the trainer would
    choose here, and the result gives the figures of every candidate.
    """
    from .model import MiniGrok

    device = torch.device(device)
    choice = resolve_dtype(dtype, config, batch_size * seq_len, device, training=True, field="--dtype")
    dtype = choice.dtype
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(0)
    ours = MiniGrok(config).to(device)
    flops_per_token = ours.report(context=seq_len).train_flops_per_token
    maybe_compile = torch.compile if compile else (lambda model: model)
    steps_by_name = {
        "ours": _training_step(
            maybe_compile(ours),
            lambda m: m(inputs, targets=targets).loss,
            torch.optim.AdamW(ours.parameters(), fused=True),
            dtype,
            device,
        )
    }
    if "naive-loss" in compare:
        naive_loss = lambda m: F.cross_entropy(m(inputs).logits.flatten(0, 1).float(), targets.flatten())  # noqa: E731
        steps_by_name["naive_loss"] = _training_step(
            maybe_compile(ours), naive_loss, torch.optim.AdamW(ours.parameters(), fused=True), dtype, device
        )
    if "hf" in compare:
        import transformers

        from .hf import hf_config_dict

        hf_config = transformers.LlamaConfig(**hf_config_dict(config) | {"use_cache": False})
        llama = transformers.LlamaForCausalLM(hf_config).to(device)
        hf_loss = lambda m: m(input_ids=inputs, labels=ids[:, :-1]).loss  # noqa: E731
        hf_optimizer = torch.optim.AdamW(llama.parameters(), fused=True)
        steps_by_name["hf"] = _training_step(maybe_compile(llama), hf_loss, hf_optimizer, dtype, device)
        if dtype != "fp32":
            steps_by_name["hf_fp32"] = _training_step(maybe_compile(llama), hf_loss, hf_optimizer, "fp32", device)
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for step in steps_by_name.values():
        _time_steps(step, warmup, device)
    for _ in range(steps):  # interleaved, so drift on a shared machine hits every model alike
        for name, step in steps_by_name.items():
            times[name] += _time_steps(step, 1, device)
    peak_bytes = {name: _peak_bytes(step, device)[0] for name, step in steps_by_name.items()}
    peak = matmul_peak_flops(dtype, device)
    tokens = batch_size * seq_len
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **choice.to_dict(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "compile": compile,
        "peak_flops": peak,
        "train_flops_per_token": flops_per_token,
    }
    for name, values in times.items():
        prefix = "" if name == "ours" else f"{name}_"
        median = sorted(values)[len(values) // 2]
        result[f"{prefix}step_s_median"] = median
        result[f"{prefix}step_s_p20_p80"] = [_quantile(values, 0.2), _quantile(values, 0.8)]
        result[f"{prefix}tokens_per_s"] = tokens / median
        result[f"{prefix}mfu"] = tokens / median * flops_per_token / peak
        result[f"{prefix}peak_mb"] = peak_bytes[name] / 2**20
    if "naive-loss" in compare:
        result["ratio_vs_naive_loss"] = result["tokens_per_s"] / result["naive_loss_tokens_per_s"]
    if "hf" in compare:
        result["ratio_vs_hf"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
        if dtype != "fp32":
            result["ratio_vs_hf_fp32"] = result["tokens_per_s"] / result["hf_fp32_tokens_per_s"]
    return result


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- Kernel microbenchmarks: `minigrok bench kernels OP` -------------------------------------------------------------

MODES = ("fwd", "bwd", "fwd+bwd")
INTERPRETER_NOTE = "interpreter: correctness only, not a kernel time"


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the `with` block and live at one time (any device, made for CPU).

    Every op's output whose storage is new (not shared with an input: views and in-place ops add nothing) adds its
    exact nbytes; a weakref finalizer on the storage takes them off when it is freed. Unseen: scratch that a kernel
    allocates and frees within one op, memory outside torch (numpy), and frees of storages made before the block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()  # ids of storages counted in `live`

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            # torch keeps one Python object per storage while the storage lives, so its id names it until freed.
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


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


def _inputs(device: torch.device, *tensors: tuple[tuple[int, ...], torch.dtype, bool, float]) -> Callable[[], tuple]:
    """Factory of seeded random tensors, each given as (shape, dtype, requires_grad, scale)."""

    def make() -> tuple:
        generator = torch.Generator(device=device).manual_seed(0)
        return tuple(
            (torch.randn(shape, generator=generator, device=device) * scale).to(dtype).requires_grad_(grad)
            for shape, dtype, grad, scale in tensors
        )

    return make


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


def _flex_attention() -> Callable:
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
    from torch.nn.attention import SDPBackend

    gpu = device.type == "cuda"
    n_heads = 16 if gpu else 2
    sizes = sizes or ([32, 64] if quick else [512, 1024, 2048, 4096, 8192, 16384] if gpu else [128, 256])
    head_dims = head_dims or ([16] if quick else [64, 128] if gpu else [64])
    gqa = gqa or ([1, 4, 16] if gpu else [2])
    if bad := [ratio for ratio in gqa if n_heads % ratio]:
        raise ValueError(f"--gqa {bad}: each query-per-KV-head ratio must divide the {n_heads} query heads")
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
                _inputs(device, *[(shape, dtype, True, 1.0) for shape in (q_shape, kv_shape, kv_shape)]),
                {"causal": is_causal},
                flops={"fwd": fwd_flops, "bwd": 2.5 * fwd_flops},
                # forward reads q, k, v and writes o; backward reads those and do, and writes dq, dk, dv
                bytes={"fwd": 2 * q_bytes + 2 * kv_bytes, "bwd": 4 * q_bytes + 4 * kv_bytes},
            )
        )
    providers = {
        "ours-triton": functools.partial(functional.attention, backend="triton"),
        "ours-torch": functools.partial(functional.attention, backend="torch"),
    }
    for name, backend in [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("math", SDPBackend.MATH),
    ]:
        providers[f"sdpa-{name}"] = _sdpa(backend)
    if gpu and importlib.util.find_spec("torch.nn.attention.flex_attention"):
        providers["flex"] = _flex_attention()
    baseline = "sdpa-math" if gpu else "ours-torch"
    return KernelSpec("seq_len", cases, providers, baseline, ("ours-triton",))


def _row_sizes(device: torch.device, quick: bool, sizes: list[int] | None, rows: int | None) -> tuple[list[int], int]:
    """Swept hidden sizes and the fixed row count of the memory-bound ops."""
    gpu = device.type == "cuda"
    sizes = sizes or ([64, 128] if quick else [1024, 2048, 4096, 8192, 16384] if gpu else [256, 512, 1024])
    return sizes, rows or (16 if quick else 4096 if gpu else 256)


def _two_backends(fn: Callable) -> dict[str, Callable]:
    return {name: functools.partial(fn, backend=name) for name in ("triton", "torch")}


def rms_norm_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    rows: int | None = None,
) -> KernelSpec:
    """RMSNorm of [rows, hidden] over hidden size."""
    sizes, rows = _row_sizes(device, quick, sizes, rows)
    cases = [
        Case(
            hidden,
            f"rows={rows}",
            _inputs(device, ((rows, hidden), dtype, True, 1.0), ((hidden,), dtype, True, 1.0)),
            # forward reads x, w and writes y; backward reads x, w, dy and writes dx, dw
            bytes={"fwd": (2 * rows + 1) * hidden * dtype.itemsize, "bwd": (3 * rows + 2) * hidden * dtype.itemsize},
        )
        for hidden in sizes
    ]
    return KernelSpec("hidden", cases, _two_backends(functional.rms_norm), "torch", ("triton",))


def rope_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    rows: int | None = None,
) -> KernelSpec:
    """RoPE on q [1, hidden / D, T, D] and k with a quarter of the heads, over hidden size, T = rows."""
    sizes, rows = _row_sizes(device, quick, sizes, rows)
    head_dim = 16 if quick else 128 if device.type == "cuda" else 64
    if bad := [hidden for hidden in sizes if hidden % head_dim]:
        raise ValueError(f"rope: hidden sizes {bad} are not multiples of the head dim {head_dim}")
    cos, sin = functional.rope_cos_sin(torch.arange(rows, device=device), head_dim)
    cases = []
    for hidden in sizes:
        q_heads = hidden // head_dim
        kv_heads = max(1, q_heads // 4)
        qk_bytes = rows * (q_heads + kv_heads) * head_dim * dtype.itemsize
        table_bytes = 2 * cos.numel() * cos.element_size()
        make = _inputs(
            device, ((1, q_heads, rows, head_dim), dtype, True, 1.0), ((1, kv_heads, rows, head_dim), dtype, True, 1.0)
        )
        # both directions read q, k (or their gradients) and the cos/sin tables, and write as much
        traffic = 2 * qk_bytes + table_bytes
        cases.append(
            Case(
                hidden,
                f"T={rows} D={head_dim} Hkv=Hq/4",
                lambda make=make: (*make(), cos, sin),
                bytes={"fwd": traffic, "bwd": traffic},
            )
        )
    return KernelSpec("hidden", cases, _two_backends(functional.apply_rope), "torch", ("triton",))


def swiglu_spec(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    sizes: list[int] | None = None,
    rows: int | None = None,
) -> KernelSpec:
    """silu(gate) * up on [rows, hidden] over hidden size."""
    sizes, rows = _row_sizes(device, quick, sizes, rows)
    cases = [
        Case(
            hidden,
            f"rows={rows}",
            _inputs(device, *[((rows, hidden), dtype, True, 1.0)] * 2),
            # forward reads gate, up and writes out; backward reads gate, up, dout and writes dgate, dup
            bytes={"fwd": 3 * rows * hidden * dtype.itemsize, "bwd": 5 * rows * hidden * dtype.itemsize},
        )
        for hidden in sizes
    ]
    return KernelSpec("hidden", cases, _two_backends(functional.swiglu), "torch", ("triton",))


def _naive_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
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
    gpu = device.type == "cuda"
    sizes = sizes or ([64, 128] if quick else [8192, 16384, 32768, 65536, 131072] if gpu else [1024, 4096, 8192])
    rows = rows or (32 if quick else 8192 if gpu else 512)
    hidden = hidden or (16 if quick else 2048 if gpu else 256)
    cases = []
    for vocab in sizes:
        make = _inputs(device, ((rows, hidden), dtype, True, 1.0), ((vocab, hidden), dtype, True, hidden**-0.5))
        targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(0)).to(device)
        cases.append(
            Case(
                vocab,
                f"tokens={rows} hidden={hidden}",
                lambda make=make, targets=targets: (*make(), targets),
                flops={"fwd": 2 * rows * vocab * hidden, "bwd": 4 * rows * vocab * hidden},
            )
        )
    providers = {
        "triton": functools.partial(functional.linear_cross_entropy, backend="triton"),
        "torch-chunked": functools.partial(functional.linear_cross_entropy, backend="torch"),
        "naive": _naive_linear_cross_entropy,
    }
    # The fused paths form the gradients during the forward, so a backward timed alone would mean nothing.
    return KernelSpec("vocab", cases, providers, "naive", ("triton",), modes=("fwd", "fwd+bwd"))


KERNEL_SPECS = {
    "attention": attention_spec,
    "rms_norm": rms_norm_spec,
    "rope": rope_spec,
    "swiglu": swiglu_spec,
    "linear_cross_entropy": linear_cross_entropy_spec,
}


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _step(fn: Callable, inputs: tuple, kwargs: dict, mode: str) -> Callable[[], list[torch.Tensor]]:
    """A call that runs one mode of `fn` and returns what it produced: outputs (fwd) or input gradients."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd":

        def forward() -> list[torch.Tensor]:
            with torch.no_grad():
                return _as_list(fn(*inputs, **kwargs))

        return forward
    outputs = _as_list(fn(*inputs, **kwargs))  # the graph that "bwd" runs back through, again and again
    generator = torch.Generator(device=outputs[0].device).manual_seed(1)
    grad_outputs = [torch.randn(o.shape, generator=generator, device=o.device).to(o.dtype) for o in outputs]
    if mode == "fwd+bwd":
        return lambda: list(torch.autograd.grad(_as_list(fn(*inputs, **kwargs)), leaves, grad_outputs))
    return lambda: list(torch.autograd.grad(outputs, leaves, grad_outputs, retain_graph=True))


def _peak_bytes(step: Callable, device: torch.device) -> tuple[int, list[torch.Tensor]]:
    """(peak bytes allocated during one call above those live before it, the call's result)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    with LiveTensorBytes() as tracker:
        result = step()
    return tracker.peak, result


def _times_ms(step: Callable, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) of the time of one call in ms, after warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(step, quantiles=[0.5, 0.2, 0.8]))
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8)


def _measure(step_factory: Callable, device: torch.device, interpreted: bool, repeats: int) -> dict:
    """Time one provider in one mode; its first call also gives the CPU peak memory and the result to check."""
    with warnings.catch_warnings(record=True) as caught:  # kept only to explain a failure
        warnings.simplefilter("always")
        try:
            step = step_factory()
            start = time.perf_counter()
            peak, result = _peak_bytes(step, device)
            first_ms = 1e3 * (time.perf_counter() - start)
        except Exception as error:  # a provider that cannot run this case on this device is recorded, not fatal
            why = [f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"]
            return {"note": "skipped: " + "; ".join(why + [str(w.message).splitlines()[0] for w in caught])[:300]}
    if interpreted:  # the interpreter's time is no kernel time, so one call is enough
        return {"median_ms": first_ms, "p20_ms": first_ms, "p80_ms": first_ms, "peak": peak, "result": result}
    median, p20, p80 = _times_ms(step, device, repeats)
    if device.type == "cuda":  # measured again, now that compilation and autotuning are done
        peak, _ = _peak_bytes(step, device)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak": peak, "result": result}


def _max_error(result: list[torch.Tensor], reference: list[torch.Tensor] | None) -> float | None:
    if reference is None:
        return None
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(result, reference, strict=True))


def run_metadata(device: torch.device) -> dict:
    """Device, versions, thread count and time stamp, written beside every figure."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_kernels(
    op: str,
    device: str = "cpu",
    dtype: str = "fp32",
    mode: str = "all",
    quick: bool = False,
    providers: list[str] | None = None,
    repeats: int = 10,
    progress: bool = False,
    **options,
) -> list[dict]:
    """One row per case x provider x mode of the op's sweep; `options` go to the op's spec (e.g. sizes, rows)."""
    if op not in KERNEL_SPECS:
        raise ValueError(f"unknown op {op!r}: pick one of {list(KERNEL_SPECS)}")
    builder = KERNEL_SPECS[op]
    if unknown := [name for name in options if name not in inspect.signature(builder).parameters]:
        raise ValueError(f"{op} has no option {', '.join('--' + n.replace('_', '-') for n in unknown)}")
    device = torch.device(device)
    spec = builder(device, TORCH_DTYPES[dtype], quick, **options)
    modes = spec.modes if mode == "all" else (mode,)
    if mode not in (*spec.modes, "all"):
        raise ValueError(f"{op} has modes {spec.modes}, not {mode!r}")
    if unknown := [name for name in providers or () if name not in spec.providers]:
        raise ValueError(f"{op} has no provider {unknown}: pick from {list(spec.providers)}")
    # The baseline runs first: speed-ups and errors refer to it.
    names = sorted(providers or spec.providers, key=lambda name: name != spec.baseline)
    metadata = run_metadata(device)
    rows = []
    for index, case in enumerate(spec.cases):
        if progress:
            print(f"[{index + 1}/{len(spec.cases)}] {op} {case.shape} {spec.x_name}={case.x}", file=sys.stderr)
        inputs = case.make()
        for mode_name in modes:
            base_ms, reference = None, None
            for name in names:
                interpreted = name in spec.triton and device.type == "cpu"
                step_factory = functools.partial(_step, spec.providers[name], inputs, case.kwargs, mode_name)
                measured = _measure(step_factory, device, interpreted, repeats)
                if name == spec.baseline:
                    base_ms, reference = measured.get("median_ms"), measured.get("result")
                row = {"op": op, "provider": name, "mode": mode_name, "x_name": spec.x_name, "x": case.x}
                row |= {"shape": case.shape, "dtype": dtype} | _figures(case, mode_name, measured, base_ms, reference)
                if interpreted:  # rates and ratios of an interpreter time would only mislead
                    row |= dict.fromkeys(("tflops", "gbps", "speedup"))
                row["note"] = measured.get("note", INTERPRETER_NOTE if interpreted else "")
                rows.append(row | metadata)
    return rows


def _figures(case: Case, mode: str, measured: dict, base_ms: float | None, reference: list | None) -> dict:
    """Times, throughput, peak memory, speed-up over the baseline and error against it, for one measurement."""
    if "median_ms" not in measured:
        return dict.fromkeys(("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mb", "speedup", "max_err"))
    figures = {key: measured[key] for key in ("median_ms", "p20_ms", "p80_ms")}
    seconds = measured["median_ms"] / 1e3
    for key, work, unit in (("tflops", case.flops, 1e12), ("gbps", case.bytes, 1e9)):
        amount = work and (work["fwd"] + work["bwd"] if mode == "fwd+bwd" else work[mode])
        figures[key] = amount / seconds / unit if amount else None
    figures["peak_mb"] = measured["peak"] / 2**20
    figures["speedup"] = base_ms / measured["median_ms"] if base_ms else None
    figures["max_err"] = _max_error(measured["result"], reference)
    return figures


_TABLE_COLUMNS = {
    "shape": "{}",
    "provider": "{}",
    "mode": "{}",
    "x": "{}",
    "median_ms": "{:.4g}",
    "p20_ms": "{:.4g}",
    "p80_ms": "{:.4g}",
    "tflops": "{:.3g}",
    "gbps": "{:.3g}",
    "peak_mb": "{:.4g}",
    "speedup": "{:.2f}x",
    "max_err": "{:.1e}",
    "note": "{}",
}


def format_table(rows: list[dict]) -> str:
    """The rows that ran as an aligned text table (columns empty in every row dropped), then the skipped providers."""
    ran = [row for row in rows if row["median_ms"] is not None]
    columns = [key for key in _TABLE_COLUMNS if any(row[key] not in (None, "") for row in ran)]
    header = [rows[0]["x_name"] if key == "x" else key for key in columns]
    cells = [header] + [
        ["" if row[key] is None else _TABLE_COLUMNS[key].format(row[key]) for key in columns] for row in ran
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    skipped = {(row["provider"], row["note"]) for row in rows if row["median_ms"] is None}
    lines += [f"{provider}: {note}" for provider, note in sorted(skipped)]
    return "\n".join(lines)


def write_json(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def write_csv(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


PLOT_METRICS = {"attention": ("tflops",), "linear_cross_entropy": ("median_ms", "peak_mb")}  # others: gbps


def plot_rows(rows: list[dict], path: str | Path) -> None:
    """PNG with one panel per shape x metric (rows) and mode (columns), one line per provider against x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    panels = list(itertools.product(shapes, PLOT_METRICS.get(rows[0]["op"], ("gbps",))))
    figure, axes = plt.subplots(len(panels), len(modes), figsize=(4.5 * len(modes), 3.2 * len(panels)), squeeze=False)
    for (shape, metric), panel_row in zip(panels, axes, strict=True):
        for mode, ax in zip(modes, panel_row, strict=True):
            for provider in dict.fromkeys(row["provider"] for row in rows):
                points = [
                    (row["x"], row[metric])
                    for row in rows
                    if (row["shape"], row["mode"], row["provider"]) == (shape, mode, provider)
                    and row[metric] is not None
                ]
                if points:
                    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set(xlabel=rows[0]["x_name"], ylabel=metric, title=f"{mode}  {shape}")
            ax.title.set_fontsize(8)
            ax.legend(fontsize=7)
    figure.suptitle(f"{rows[0]['op']} ({rows[0]['dtype']}, {rows[0]['device']})")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)

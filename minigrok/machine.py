"""Facts about this machine, measured rather than assumed: the fastest safe dtype and the matmul peak behind MFU.

Which dtype is fastest changes from one CPU to the next (bf16 matmul runs anywhere from 3x to 0.02x fp32 on
common x86 parts), so nothing here is hard-coded. Both probes are capped by wall time, not by size: a dtype
that is slow on this machine costs a tenth of a second at most before it leaves the race, never minutes.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A lower precision must make the matmuls at least this much faster than a safer choice to replace it: they are
# only part of a step (norms, attention and the loss speed up less, or not at all), so a small matmul gain is none.
MIN_SPEEDUP = 1.25
DROP_FACTOR = 3.0  # a dtype this much slower than the best on a decisive problem leaves the race there
DECISIVE_S = 1e-3  # a problem whose fastest call takes less is too small to judge: per-call overheads and noise rule
SLOW_WARNING = 2.0  # an explicit dtype this much slower than fp32 gets a warning
PROBE_BUDGET_S = 0.5  # wall time of the dtype probe
PEAK_BUDGET_S = 0.4  # wall time of the matmul peak
MAX_PROBE_DIM = 1024  # wider weights are probed on a slice this wide: the same kernels at a bounded cost
FIRST_LEVEL_FLOPS = 5e6  # work of the race's first (smallest) problem: ~5 ms even at 1 GFLOP/s


def reading_back_is_free(t: torch.Tensor) -> bool:
    """True on the CPU, where reading a tensor's values into Python waits for nothing; elsewhere it waits on the device."""
    return t.device.type == "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype`: weights stay as they are, matmuls run in dtype. Nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=TORCH_DTYPES[dtype])


def candidate_dtypes(device: torch.device) -> list[str]:
    """Dtypes whose numerics are safe on `device`, safest first: fp32; bf16 autocast over fp32 master weights;
    fp16 autocast on CUDA only, where the trainer scales the loss."""
    if device.type != "cuda":
        return ["fp32", "bf16"]
    return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]


def choose_dtype(rates: dict[str, float | None], min_speedup: float = MIN_SPEEDUP) -> str:
    """The dtype to run in, from measured FLOP/s of each candidate listed safest first (None: not measured).

    A later candidate replaces the choice only when it is at least `min_speedup` times as fast, so a near tie
    (within timing noise) keeps the safer dtype. A pure function of the figures: tested without timing anything.
    """
    chosen = None
    for dtype, rate in rates.items():
        if rate and (chosen is None or rate >= min_speedup * rates[chosen]):
            chosen = dtype
    if chosen is None:
        raise ValueError(f"no dtype was measured: {rates}")
    return chosen


def time_call(call: Callable[[], object], device: torch.device, deadline: float, min_s: float = 0.01) -> float | None:
    """Best seconds of one `call`: a warm-up (allocation, kernel choice), then at least two timed calls and about
    min_s of them, never starting one that would end past `deadline`. None when no timed call fitted."""

    def once() -> float:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        return time.perf_counter() - start

    if time.perf_counter() >= deadline:
        return None
    last = once()
    timings: list[float] = []
    while (len(timings) < 2 or sum(timings) < min_s) and time.perf_counter() + last <= deadline:
        last = once()
        timings.append(last)
    return min(timings, default=None)


def race(
    measure: Callable[[str, int, float], float | None],
    candidates: list[str],
    max_rows: int,
    first_rows: int,
    budget_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, tuple[int, float]]:
    """Time the candidates on growing problems until max_rows or the budget; returns {dtype: (rows, seconds per
    call)} at the largest row count each one reached (empty when not even the first problem fitted).

    `measure(dtype, rows, deadline)` gives seconds per call, or None when the deadline came first. Rows grow 4x per
    level while the next level is predicted to fit (a level the deadline cuts short is not used). A dtype
    DROP_FACTOR slower than the best on the first decisive level (best call >= DECISIVE_S) is not timed again, so one
    that is very slow here costs only the small problems.
    """
    deadline = clock() + budget_s
    alive, reached = list(candidates), {}
    rows = min(first_rows, max_rows)
    while True:
        level = {dtype: seconds for dtype in alive if (seconds := measure(dtype, rows, deadline)) is not None}
        if reached and len(level) < len(alive):  # the deadline cut this level short: compare on the one before
            break
        reached |= {dtype: (rows, seconds) for dtype, seconds in level.items()}
        if not level:
            break
        best = min(level.values())
        # A dtype the deadline left untimed on this first level is out; so, once a level is decisive, is one that is
        # DROP_FACTOR slower than the best.
        alive = [dtype for dtype, seconds in level.items() if best < DECISIVE_S or seconds <= DROP_FACTOR * best]
        next_rows = min(max_rows, rows * 4)
        predicted = sum(3 * level[dtype] * next_rows / rows for dtype in alive)  # a warm-up and two timed calls
        if next_rows == rows or clock() + predicted > deadline:
            break
        rows = next_rows
    return reached


@dataclass
class DtypeChoice:
    """The dtype a job runs in, why (`source`: auto / explicit / resumed), and what was measured to decide it."""

    dtype: str
    source: str
    rates: dict[str, float] = field(default_factory=dict)  # achieved FLOP/s per candidate on the model's matmuls
    rows: dict[str, int] = field(default_factory=dict)  # the problem size each rate was measured at
    wall_s: float = 0.0
    note: str | None = None  # a warning or remark worth one line on the console

    def summary(self) -> str:
        measured = ", ".join(f"{name} {rate / 1e9:,.1f} GFLOP/s" for name, rate in self.rates.items())
        figures = f" (measured in {self.wall_s:.2f} s: {measured})" if self.rates else ""
        return f"dtype: {self.dtype}, {self.source}{figures}" + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "dtype_source": self.source,
            "dtype_gflops": {name: rate / 1e9 for name, rate in self.rates.items()},
            "dtype_probe_rows": self.rows,
            "dtype_probe_s": self.wall_s,
            "dtype_note": self.note,
        }


def matmul_shapes(config) -> tuple[tuple[int, int], ...]:
    """(in, out) features of a model's main matmuls, [dim -> ffn_dim] and [dim -> vocab], each capped for probing."""
    return tuple(
        (min(config.dim, MAX_PROBE_DIM), min(out, MAX_PROBE_DIM)) for out in (config.ffn_dim, config.vocab_size)
    )


def _matmul_work(shapes, dtype: str, rows: int, device: torch.device, training: bool) -> Callable[[], None]:
    """One call of the matmuls a step runs in `dtype`: forward and both backward products when training
    (autocast over fp32 weights, as the trainer runs), the forward alone otherwise (weights in dtype)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(shape, generator=generator, device=device).to(dtype).requires_grad_(grad)

    low = TORCH_DTYPES[dtype]
    if training:
        tensors = [(randn(rows, k, grad=True), randn(n, k, grad=True), randn(rows, n, dtype=low)) for k, n in shapes]

        def step() -> None:
            for x, weight, grad_out in tensors:
                with autocast(dtype, device):
                    out = F.linear(x, weight)
                # A scalar to differentiate, as a loss is: autograd given grad_outputs imports sympy on first use.
                torch.autograd.grad((out * grad_out).sum(), (x, weight))

        return step
    tensors = [(randn(rows, k, dtype=low), randn(n, k, dtype=low)) for k, n in shapes]

    def forward() -> None:
        with torch.no_grad():
            for x, weight in tensors:
                F.linear(x, weight)

    return forward


@functools.cache
def measure_dtypes(
    shapes: tuple[tuple[int, int], ...],
    rows: int,
    device: torch.device,
    training: bool,
    budget_s: float = PROBE_BUDGET_S,
) -> tuple[dict[str, float], dict[str, int], float]:
    """({dtype: FLOP/s}, {dtype: rows measured at}, seconds spent) for every safe candidate on these matmuls, up to
    `rows` rows (batch x sequence); a dtype that could not be timed within the budget is missing. Cached: a process
    measures each problem once."""
    flops_per_row = (6 if training else 2) * sum(k * n for k, n in shapes)
    first_rows = 1 << max(0, min(4, int(FIRST_LEVEL_FLOPS // flops_per_row).bit_length() - 1))

    def measure(dtype: str, level_rows: int, deadline: float) -> float | None:
        return time_call(_matmul_work(shapes, dtype, level_rows, device, training), device, deadline)

    start = time.perf_counter()
    candidates = candidate_dtypes(device)
    # A dtype's first call in a process can pay one-time costs that measure nothing (kernel code paged in from
    # disk, JIT, lazy set-up; from milliseconds to a second on a cold machine, and paid by training anyway): pay
    # them on a one-row problem before the race, whose budget starts after them.
    for dtype in candidates:
        _matmul_work(shapes, dtype, 1, device, training)()
    reached = race(measure, candidates, rows, first_rows, budget_s)
    rates = {dtype: flops_per_row * level_rows / seconds for dtype, (level_rows, seconds) in reached.items()}
    return rates, {dtype: level_rows for dtype, (level_rows, _) in reached.items()}, time.perf_counter() - start


def resolve_dtype(
    requested: str,
    config,
    rows: int,
    device: torch.device,
    training: bool,
    recorded: str | None = None,
    field: str = "dtype",
) -> DtypeChoice:
    """The dtype to run `config`'s model in: `requested` when explicit, else the fastest safe one measured here.

    `recorded` is the dtype a resumed run was trained in: "auto" keeps it, so the run continues bit for bit even on a
    machine that would choose differently (said in the note). An explicit low precision that measures SLOW_WARNING
    times slower than fp32 is honoured, with a note saying so. `field` names the setting in error messages.
    """
    if requested not in ("auto", *TORCH_DTYPES):
        raise ValueError(f"{field}={requested!r} is unknown: choose auto or one of {list(TORCH_DTYPES)}")
    candidates = candidate_dtypes(device)
    if requested != "auto" and requested not in candidates:
        safe = ", ".join(["auto", *candidates])
        reason = " (fp16 needs loss scaling, which only runs on a GPU)" if requested == "fp16" else ""
        raise ValueError(f"{field}={requested} is not supported on {device.type}{reason}: use one of {safe}")
    if requested == "auto" and recorded is not None and recorded not in candidates:
        raise ValueError(
            f"{field}=auto: the run was trained in {recorded!r}, which cannot run on {device.type}; "
            f"set {field} to one of {candidates} to continue it (not bit for bit)"
        )
    notes = []
    if requested == "fp32":  # always safe: nothing to measure
        rates, probe_rows, wall_s = {}, {}, 0.0
    else:
        rates, probe_rows, wall_s = measure_dtypes(matmul_shapes(config), rows, device, training)
        if unmeasured := [dtype for dtype in candidates if dtype not in rates]:
            notes.append(f"{', '.join(unmeasured)} could not be timed within the probe's {PROBE_BUDGET_S} s")
    fastest = choose_dtype(rates) if rates else "fp32"
    if requested == "auto" and recorded:
        dtype, source = recorded, "resumed"
        if fastest != recorded:
            notes.append(
                f"this machine measures {fastest} fastest; the run keeps its {recorded} so it continues bit for bit"
            )
    elif requested == "auto":
        dtype, source = fastest, "auto"
    else:
        dtype, source = requested, "explicit"
        if dtype in rates and "fp32" in rates and rates[dtype] * SLOW_WARNING <= rates["fp32"]:
            slower = rates["fp32"] / rates[dtype]
            notes.append(f"warning: {dtype} measured {slower:.1f}x slower than fp32 here; auto would choose {fastest}")
        if recorded and recorded != dtype:
            notes.append(
                f"the run so far was trained in {recorded}; it continues in {dtype} as asked, so not bit for bit"
            )
    return DtypeChoice(dtype, source, rates, probe_rows, wall_s, "; ".join(notes) or None)


@functools.cache
def matmul_peak_flops(dtype: str, device: torch.device, budget_s: float = PEAK_BUDGET_S) -> float:
    """Best achieved FLOP/s of a square matmul in `dtype`: the ceiling MFU is measured against.

    Sizes double from 128 while the next one fits the time budget, so it costs at most about budget_s however
    slow the dtype is here. Cached: measured once per process and dtype.
    """
    deadline = time.perf_counter() + budget_s
    generator = torch.Generator(device=device).manual_seed(0)
    max_size = 8192 if device.type == "cuda" else 4096
    best, size = 0.0, 128
    while True:
        a, b = (torch.randn(size, size, generator=generator, device=device).to(TORCH_DTYPES[dtype]) for _ in "ab")
        seconds = time_call(lambda a=a, b=b: a @ b, device, deadline)
        if seconds is None:
            break
        best = max(best, 2 * size**3 / seconds)
        if size >= max_size or time.perf_counter() + 3 * 8 * seconds > deadline:  # next: 8x the work, 3 calls
            break
        size *= 2
    return best

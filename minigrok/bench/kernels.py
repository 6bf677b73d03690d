"""`minigrok bench kernels OP`: one row per case x provider x mode, timed, checked against the baseline."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import inspect
import sys
import time
import warnings
from collections.abc import Callable

import torch

from ..machine import TORCH_DTYPES
from .memory import peak_bytes
from .specs import KERNEL_SPECS, Case
from .timing import INTERPRETER_NOTE, Timing, clock_resolution, measure_timing

# fwd+bwd does the work of fwd and of bwd (and autograd's bookkeeping, which on a tiny case can double it); a time
# out of line with its other modes by more than this lost the core during every one of its calls, spread or not.
MODE_SLACK = 3.0
FIGURES = ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mb", "speedup", "max_err", "stable")


def as_tensor_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def mode_call(fn: Callable, inputs: tuple, kwargs: dict, mode: str) -> Callable[[], list[torch.Tensor]]:
    """A call that runs one mode of `fn` and returns what it produced: outputs (fwd) or input gradients."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd":

        def forward() -> list[torch.Tensor]:
            with torch.no_grad():
                return as_tensor_list(fn(*inputs, **kwargs))

        return forward
    outputs = as_tensor_list(fn(*inputs, **kwargs))  # the graph that "bwd" runs back through, again and again
    generator = torch.Generator(device=outputs[0].device).manual_seed(1)
    grad_outputs = [torch.randn(o.shape, generator=generator, device=o.device).to(o.dtype) for o in outputs]
    if mode == "fwd+bwd":
        return lambda: list(torch.autograd.grad(as_tensor_list(fn(*inputs, **kwargs)), leaves, grad_outputs))
    return lambda: list(torch.autograd.grad(outputs, leaves, grad_outputs, retain_graph=True))


def measure_provider(make_call: Callable[[], Callable], device: torch.device, interpreted: bool, repeats: int) -> dict:
    """Time one provider in one mode: {"timing", "peak" bytes, "result" to check}, or {"note"} saying why it could not
    run. Its first call also gives the CPU peak memory and the result."""
    with warnings.catch_warnings(record=True) as caught:  # kept only to explain a failure
        warnings.simplefilter("always")
        try:
            call = make_call()
            start = time.perf_counter()
            peak, result = peak_bytes(call, device)
            first_s = time.perf_counter() - start
        except Exception as error:  # a provider that cannot run this case on this device is recorded, not fatal
            why = [f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"]
            return {"note": "skipped: " + "; ".join(why + [str(w.message).splitlines()[0] for w in caught])[:300]}
    if interpreted:  # the interpreter's time is no kernel time, so one call is enough
        return {"timing": Timing(first_s, first_s, first_s, clock_resolution()), "peak": peak, "result": result}
    timing = measure_timing(call, device, repeats)
    if device.type == "cuda":  # measured again, now that compilation and autotuning are done
        peak, _ = peak_bytes(call, device)
    return {"timing": timing, "peak": peak, "result": result}


def max_abs_error(result: list[torch.Tensor], reference: list[torch.Tensor] | None) -> float | None:
    if reference is None:
        return None
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(result, reference, strict=True))


def row_figures(
    case: Case, mode: str, measured: dict, interpreted: bool, base_s: float | None, reference: list | None
) -> dict:
    """Times, throughput, peak memory, speed-up over the baseline, error against it, and whether the time holds."""
    if "timing" not in measured:
        return dict.fromkeys(FIGURES) | {"note": measured["note"]}
    timing: Timing = measured["timing"]
    figures = {"median_ms": 1e3 * timing.median_s, "p20_ms": 1e3 * timing.p20_s, "p80_ms": 1e3 * timing.p80_s}
    for key, work, unit in (("tflops", case.flops, 1e12), ("gbps", case.bytes, 1e9)):
        amount = work and (work["fwd"] + work["bwd"] if mode == "fwd+bwd" else work[mode])
        figures[key] = amount / timing.median_s / unit if amount else None
    figures["peak_mb"] = measured["peak"] / 2**20
    figures["speedup"] = base_s / timing.median_s if base_s else None
    figures["max_err"] = max_abs_error(measured["result"], reference)
    if interpreted:  # rates and ratios of an interpreter time would only mislead, and one call has no spread
        return figures | dict.fromkeys(("tflops", "gbps", "speedup", "stable")) | {"note": INTERPRETER_NOTE}
    return figures | {"stable": timing.stable, "note": timing.note}


def flag_modes_out_of_line(rows: list[dict]) -> None:
    """Mark unstable, in place, a stable-looking time that the same provider's other modes on the same case belie:
    fwd+bwd far over fwd + bwd, or fwd or bwd far over fwd+bwd."""
    by_mode: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["stable"]:
            by_mode.setdefault((row["provider"], row["shape"], row["x"]), {})[row["mode"]] = row
    for modes in by_mode.values():
        if "fwd+bwd" not in modes:
            continue
        whole, parts = modes["fwd+bwd"], [modes[mode] for mode in ("fwd", "bwd") if mode in modes]
        bound = {"fwd+bwd": sum(row["median_ms"] for row in parts)} if len(parts) == 2 else {}
        bound |= {row["mode"]: whole["median_ms"] for row in parts}
        for mode, allowed in bound.items():
            if (ratio := modes[mode]["median_ms"] / allowed) > MODE_SLACK:
                modes[mode] |= {"stable": False, "note": f"unstable: {ratio:.0f}x what its other modes allow"}


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
    spec_of = KERNEL_SPECS[op]
    if unknown := [name for name in options if name not in inspect.signature(spec_of).parameters]:
        raise ValueError(f"{op} has no option {', '.join('--' + n.replace('_', '-') for n in unknown)}")
    device = torch.device(device)
    spec = spec_of(device, TORCH_DTYPES[dtype], quick, **options)
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
            base_s, reference = None, None
            for name in names:
                interpreted = name in spec.triton and device.type == "cpu"
                make_call = functools.partial(mode_call, spec.providers[name], inputs, case.kwargs, mode_name)
                measured = measure_provider(make_call, device, interpreted, repeats)
                if name == spec.baseline and "timing" in measured:
                    base_s, reference = measured["timing"].median_s, measured["result"]
                row = {"op": op, "provider": name, "mode": mode_name, "x_name": spec.x_name, "x": case.x}
                row |= {"shape": case.shape, "dtype": dtype}
                rows.append(row | row_figures(case, mode_name, measured, interpreted, base_s, reference) | metadata)
    flag_modes_out_of_line(rows)
    return rows

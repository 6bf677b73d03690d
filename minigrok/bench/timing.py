"""How long a call takes, and whether that figure can be trusted: CPU repeats or CUDA's do_bench, then a verdict."""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..machine import synchronize

# A quiet run's p20-p80 band sits well inside the 25-35 % that these shared machines drift between runs; a p80 half
# again as long as the p20 means some calls lost the core (a 4 ms scheduler tick costs a sub-ms call 10x), so the
# median tells of the neighbours more than of the code.
MAX_SPREAD = 1.5
MIN_TICKS = 20  # a time this many clock steps long is off by at most 1/MIN_TICKS (5 %) from rounding to a step
CUDA_EVENT_RESOLUTION_S = 0.5e-6  # as CUDA documents its events, which do_bench reads
INTERPRETER_NOTE = "interpreter: correctness only, not a kernel time"
UNSTABLE_HINT = "rerun with --threads 1 --repeats 50 (more calls per row, one core each), on a machine left quiet"


def quantile(values: list[float], q: float) -> float:
    """The sample nearest the q-quantile (no interpolation: a time that was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Timing:
    """Median and 20 / 80 % quantiles of one call's seconds, and the step of the clock that measured them."""

    median_s: float
    p20_s: float
    p80_s: float
    resolution_s: float

    @classmethod
    def of(cls, seconds: list[float], resolution_s: float) -> Timing:
        return cls(statistics.median(seconds), quantile(seconds, 0.2), quantile(seconds, 0.8), resolution_s)

    @property
    def note(self) -> str:
        """Why these figures cannot be trusted (a wide p20-p80 spread, or a time of a few clock steps), or ""."""
        if self.p80_s > MAX_SPREAD * self.p20_s:
            if self.p20_s == 0:
                return f"unstable: p80 is {self.p80_s * 1e3:.3g} ms, p20 is 0"
            return f"unstable: p80 is {self.p80_s / self.p20_s:.1f}x p20"
        if self.median_s < MIN_TICKS * self.resolution_s:
            return f"unstable: {self.median_s * 1e3:.3g} ms is under {MIN_TICKS} steps of a {self.resolution_s * 1e3:.3g} ms clock"
        return ""

    @property
    def stable(self) -> bool:
        return not self.note


def sample_seconds(
    call: Callable[[], object], repeats: int, device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Seconds of each of `repeats` calls, the device synchronised before each clock read."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        call()
        synchronize(device)
        seconds.append(clock() - start)
    return seconds


@functools.cache
def clock_resolution(clock: Callable[[], float] = time.perf_counter, reads: int = 1000) -> float:
    """Smallest step the clock is seen to take, in seconds: measured, as a VM's clock may be far coarser than the
    nanosecond it claims."""
    steps = (later - earlier for earlier, later in itertools.pairwise([clock() for _ in range(reads)]))
    return min((step for step in steps if step > 0), default=float("inf"))


def measure_timing(call: Callable[[], object], device: torch.device, repeats: int) -> Timing:
    """Timing of `call` after a warm-up: CUDA's do_bench (it flushes the L2 and picks its own repeats), or on CPU
    `repeats` timed calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = (ms / 1e3 for ms in do_bench(call, quantiles=[0.5, 0.2, 0.8]))
        return Timing(median, p20, p80, CUDA_EVENT_RESOLUTION_S)
    call()
    return Timing.of(sample_seconds(call, repeats, device), clock_resolution())

"""Benchmarks (`minigrok bench ...`): a timing harness with its writers, and one module per benchmark family.

`timing` (how long, and whether to trust it), `memory` (peak bytes), `output` (table, JSON, CSV, PNG); the families
`train` (training throughput and MFU), `generate` (decode and prefill speed) and `kernels` (one op per provider across shapes, swept as `specs` says).
"""

from .generate import bench_generate
from .kernels import bench_kernels
from .memory import LiveTensorBytes
from .output import format_table, plot_rows, write_csv, write_json
from .specs import KERNEL_SPECS
from .timing import INTERPRETER_NOTE
from .train import bench_processes, bench_train

__all__ = [
    "INTERPRETER_NOTE",
    "KERNEL_SPECS",
    "LiveTensorBytes",
    "bench_generate",
    "bench_kernels",
    "bench_processes",
    "bench_train",
    "format_table",
    "plot_rows",
    "write_csv",
    "write_json",
]

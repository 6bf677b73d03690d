"""Test-wide setup: Triton kernels run in the CPU interpreter when no GPU is present; injected machine figures."""

import os

import pytest
import torch

from minigrok.hf import keep_checkout_off_path

keep_checkout_off_path()  # `python -m pytest` puts the root on sys.path; transformers needs the Hub's `kernels` there

if not torch.cuda.is_available():
    # Triton reads this when @triton.jit decorates, so it must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # parallel workers share the cores instead of each taking all of them
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def measured(monkeypatch):
    """Inject what the dtype probe measures (set `measured.rates`, FLOP/s per dtype); counts the probes asked for."""
    from minigrok import machine

    class Injected:
        rates = {"fp32": 50e9, "bf16": 100e9}
        calls = 0

    def fake(shapes, rows, device, training):
        Injected.calls += 1
        return dict(Injected.rates), dict.fromkeys(Injected.rates, rows), 0.01

    monkeypatch.setattr(machine, "measure_dtypes", fake)
    return Injected

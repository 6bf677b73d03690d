"""Peak memory of one call: CUDA's allocator statistics, or on CPU every tensor storage torch allocates."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..machine import synchronize


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


def peak_bytes(call: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """(peak bytes allocated during one call above those live before it, the call's result)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = call()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    with LiveTensorBytes() as tracker:
        result = call()
    return tracker.peak, result


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the resident high-water mark)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def resident_peak_bytes(call: Callable[[], object]) -> tuple[int | None, object]:
    """(rise of this process's resident memory at its highest during one call over before it, the call's result):
    Linux's high-water mark, reset first. Unlike LiveTensorBytes it sees kernels' scratch and everything outside
    torch, but not memory the C allocator kept from earlier calls and hands out again. None where there is no /proc."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
    except OSError:
        return None, call()
    result = call()
    return (_status_kib("VmHWM") - before) * 1024, result

"""What the kernel files share: launch settings per row length, row views, the dtype check; and the dispatch's
refusal of CPU tensors for the Triton backend outside the interpreter."""

import pytest
import torch

import minigrok.functional as mf
from minigrok.kernels import _common


@pytest.mark.parametrize(
    "n_cols, block, num_warps",
    [(1, 1, 4), (48, 64, 4), (2047, 2048, 8), (2048, 2048, 8), (5000, 8192, 16), (65536, 8192, 16)],
)
def test_row_settings_block_and_warps(n_cols, block, num_warps):
    assert _common.row_settings(n_cols) == (block, num_warps)


def test_row_settings_caps_the_block():
    assert _common.row_settings(50_257, 4096) == (4096, 8)
    assert _common.row_settings(1000, 4096) == (1024, 4)
    assert _common.row_settings(100_000)[0] == _common.MAX_ROW_BLOCK


def test_as_rows_views_column_slices_and_copies_only_strided_rows():
    fused = torch.randn(2, 5, 12)
    gate = fused[..., :6]  # one half of a fused projection
    rows = _common.as_rows(gate)
    assert rows.shape == (10, 6) and rows.stride() == (12, 1) and rows.data_ptr() == gate.data_ptr()
    transposed = torch.randn(6, 10).T
    assert _common.as_rows(transposed).is_contiguous()
    assert torch.equal(_common.as_rows(transposed), transposed)
    assert _common.as_rows(torch.tensor(3.0)).shape == (1, 1)


def test_check_dtype_wants_one_supported_dtype():
    x = torch.zeros(2)
    _common.check_dtype("op", x, x.clone())
    with pytest.raises(ValueError, match="op: got dtypes torch.float32, torch.float16"):
        _common.check_dtype("op", x, x.half())
    with pytest.raises(ValueError, match="float64"):
        _common.check_dtype("op", x.double())


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        mf.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend="triton")

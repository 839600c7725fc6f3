"""pyco.probe.block_dot (the C++ kernel behind C) against a plain torch computation, and its determinism."""

from __future__ import annotations

import pytest
import torch

from pyco.probe import block_dot
from pyco.probe.cross_terms import block_dot_torch

CASES = {  # block sizes, rows
    "three small blocks": ([3, 5, 7], 3),
    "one row (mode rows)": ([4, 1, 9], 1),
    "an empty block": ([2, 0, 6], 2),
    "blocks over several chunks": ([70_000, 3, 40_001], 4),
    "32 blocks": ([37] * 32, 32),
    "no blocks": ([], 2),
}


def plain(rows, delta, sizes):
    """out[j, i] = Σ over block i of delta·rows[j], one block at a time, in float64."""
    out = torch.zeros(rows.shape[0], len(sizes), dtype=torch.float64)
    start = 0
    for i, n in enumerate(sizes):
        out[:, i] = (rows[:, start:start + n].double() * delta[start:start + n].double()).sum(dim=1)
        start += n
    return out


def offsets(sizes):
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_block_dot_matches_torch(case, dtype):
    sizes, m = CASES[case]
    gen = torch.Generator().manual_seed(len(sizes) + m)
    n = sum(sizes)
    rows = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    delta = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    out = block_dot(rows, delta, offsets(sizes))
    assert out.dtype == torch.float64 and out.shape == (m, len(sizes))
    expected = plain(rows, delta, sizes)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block_dot_torch(rows, delta, offsets(sizes)), expected, rtol=1e-12, atol=1e-12)


def test_block_dot_is_bitwise_the_same_for_any_thread_count(threads):
    gen = torch.Generator().manual_seed(0)
    sizes = [200_000, 5, 150_001]
    rows = torch.randn(3, sum(sizes), generator=gen)
    delta = torch.randn(sum(sizes), generator=gen)
    results = []
    for t in (1, 2, 3):
        threads(t)
        results.append(block_dot(rows, delta, offsets(sizes)))
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_block_dot_reads_strided_and_mixed_inputs():
    rows = torch.arange(12.0).reshape(4, 3).t()  # not contiguous
    delta = torch.ones(4, dtype=torch.float64)  # other dtype than rows: the torch twin runs
    torch.testing.assert_close(block_dot(rows, delta, [0, 1, 4]), plain(rows, delta, [1, 3]))
    torch.testing.assert_close(block_dot(rows.contiguous(), delta.float(), [0, 1, 4]), plain(rows, delta, [1, 3]))


@pytest.mark.parametrize("rows_shape, delta_shape, offs", [((2, 5), (5,), [0, 2, 4]), ((5,), (5,), [0, 5]),
                                                         ((2, 5), (4,), [0, 5])])
def test_block_dot_shape_errors(rows_shape, delta_shape, offs):
    with pytest.raises(ValueError, match=r"block_dot: rows .* do not fit the offsets"):
        block_dot(torch.zeros(rows_shape), torch.zeros(delta_shape), offs)


@pytest.mark.parametrize("offs", [[], [1, 5]])
def test_block_dot_offsets_start_at_zero(offs):
    with pytest.raises(ValueError, match=r"offsets must start with 0"):
        block_dot(torch.zeros(2, 5), torch.zeros(5), offs)


def test_kernel_rejects_decreasing_offsets():
    from pyco._ext import _C

    off = torch.tensor([0, 3, 1], dtype=torch.int64)
    buf = torch.zeros(8, dtype=torch.float64)
    out = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="offsets must not decrease"):
        _C.block_dot(buf.data_ptr(), buf.data_ptr(), _C.DTYPE_CODES["float64"], 1, off.data_ptr(), 2, out.data_ptr())

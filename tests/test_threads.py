"""The multi-threaded paths of the CPU kernels (the suite otherwise runs on one thread, see conftest.py):
batches large enough that the per-step row loop is split over threads."""

from __future__ import annotations

import pytest
import torch

from helpers import CELL_KINDS, RNN_KINDS, cell_inputs, check_twin, rnn_inputs, torch_module, twin
from rnnkernels import ops

pytestmark = pytest.mark.skipif(ops.LOAD_ERROR is not None, reason="compiled extension not loaded")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_relu"])
def test_large_batch_two_threads(kind, dtype, two_threads):
    # row work G*H = 32 (LSTM, H=8): 4096 / 32 = 128 rows per task, so B = 300 makes three tasks
    module_kw = {"bidirectional": True, **({"proj_size": 3} if kind == "LSTM" else {})}
    m = torch_module(kind, dtype=dtype, input_size=4, hidden_size=8, **module_kw)
    t = twin(m, "cpu")
    x, hx = rnn_inputs(m, T=6, B=300, hx=True, packed="unsorted")
    check_twin(m, t, x, hx)


def test_results_do_not_depend_on_thread_count():
    m = torch_module("GRU", dtype=torch.float32, input_size=4, hidden_size=8)
    t = twin(m, "cpu")
    x, hx = rnn_inputs(m, T=6, B=300, hx=True)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, h = t(x, hx)
            results.append((out.detach(), h.detach()))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("packed", [None, "unsorted"], ids=["plain", "packed"])
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_float32_partial_tiles_and_chunks(kind, packed, two_threads):
    """float32 on the panel kernels (csrc/cpu/panels.h): a hidden size that leaves part of the last block
    of units, a batch that splits into uneven row tiles, and T * B past the 256-row chunks of the weight
    gradients."""
    m = torch_module(kind, dtype=torch.float32, input_size=19, hidden_size=70, bidirectional=True)
    t = twin(m, "cpu")
    x, hx = rnn_inputs(m, T=23, B=13, hx=True, packed=packed)
    check_twin(m, t, x, hx)


@pytest.mark.parametrize("sizes", [(19, 300), (300, 24)], ids=["hidden300", "input300"])
@pytest.mark.parametrize("kind", list(RNN_KINDS))
def test_float32_products_over_more_than_one_chunk(kind, sizes, two_threads):
    """Products over more than one chunk of 256 inputs, where each pass's first tile prefetches what its
    thread reads next (NextRows in csrc/cpu/panels.h): hidden 300, the recurrent product's next chunk and
    then the next block of units; input 300 into 24 units, the input projection's next chunk (for the RNN
    one block of 24 columns, whose row tiles split between the threads, so no next block)."""
    input_size, hidden_size = sizes
    m = torch_module(kind, dtype=torch.float32, input_size=input_size, hidden_size=hidden_size)
    t = twin(m, "cpu")
    x, hx = rnn_inputs(m, T=4, B=13, hx=True)
    check_twin(m, t, x, hx)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("hidden", [37, 11])
@pytest.mark.parametrize("B", [0, 1, 3, 4, 5])
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_float32_cell_steps(kind, B, hidden, bias, two_threads):
    """float32 cells: one to four sequences take the dot-product step (csrc/cpu/panels.h; with AVX2, four
    of them two weight rows at a time), none or more the GEMM one; input and hidden sizes that leave part of
    a vector and of a block of units, and (11) a last group of 3 weight rows."""
    m = torch_module(kind, dtype=torch.float32, input_size=19, hidden_size=hidden, bias=bias)
    t = twin(m, "cpu")
    x, h = cell_inputs(m, B=B, hx=True)
    check_twin(m, t, x, h)


# (rows R, columns of a, columns of b): a^T b through the linear operator on transposed views, as the
# weight gradients call it. Cases: the wide operand a or b; few row tiles (read in place, masked) or
# many (copied chunk by chunk); a last block of 64 columns that is partly past the end; fewer blocks than
# threads, so that the row tiles split into groups.
WEIGHT_GRADIENT_SHAPES = [(299, 280, 70), (299, 70, 280), (600, 64 * 3 + 5, 19), (600, 40, 50), (600, 60, 50),
                          (1100, 50, 60), (257, 17, 300)]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("R,M,N", WEIGHT_GRADIENT_SHAPES, ids=[f"{r}x{m}x{n}" for r, m, n in WEIGHT_GRADIENT_SHAPES])
def test_weight_gradient_product(R, M, N, threads):
    """a^T b against float64, each element within a small multiple of float32's rounding of |a|^T |b|
    (a chunked sum over 256 rows stays well inside it; a wrong tile, mask or block is off by the values'
    own size)."""
    g = torch.Generator().manual_seed(R + M + N)
    a, b = torch.randn(R, M, generator=g), torch.randn(R, N, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.rnnkernels.linear(a.t(), b.t(), None)
    finally:
        torch.set_num_threads(before)
    expected = a.double().t() @ b.double()
    scale = a.double().abs().t() @ b.double().abs()
    assert got.shape == (M, N)
    assert ((got.double() - expected).abs() <= 4e-6 * scale).all()


# (rows, inputs, outputs, how w is given): products whose output passes 32 MB run on the panel kernels into
# cached blocks (csrc/cpu/recurrence.cpp, product; csrc/cpu/buffers.h): w row-major (packed), transposed
# (read in place), or with neither stride 1; input counts off the multiple of 16, and a last block of 64
# outputs that is partly past the end.
LARGE_OUTPUT_CASES = [(8200, 37, 1030, "rows"), (8200, 40, 1024, "transposed"), (8193, 21, 1024, "strided")]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M,K,N,layout", LARGE_OUTPUT_CASES, ids=[case[3] for case in LARGE_OUTPUT_CASES])
def test_large_output_product(M, K, N, layout, bias, two_threads):
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g)
    w = {"rows": lambda: torch.randn(N, K, generator=g),
         "transposed": lambda: torch.randn(K, N, generator=g).t(),
         "strided": lambda: torch.randn(N, 2 * K, generator=g)[:, ::2]}[layout]()
    b = torch.randn(N, generator=g) if bias else None
    got = torch.ops.rnnkernels.linear(x, w, b)
    assert got.nbytes >= 32 << 20
    expected = x.double() @ w.double().t() + (b.double() if bias else 0)
    scale = x.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0)
    assert ((got.double() - expected).abs() <= 4e-6 * scale + 1e-30).all()


# (rows, inputs, outputs): the input projection of lyrics-char (1027 inputs) and the input gradient of
# ptb-medium (2600 inputs). The largest deviation from float64, relative to the largest output: a BLAS
# product (torch.addmm) gives about 3.5e-7 here, the panel kernels' sums in chunks of 256 about 4.7e-7,
# one running sum over all inputs (a plain oneDNN call) 1.1e-6 to 1.7e-6. Without the panel kernels (a build
# with neither AVX-512 nor AVX2: test_portable_build.py), oneDNN sums slices of 256 inputs.
LONG_SUM_CASES = [(1120, 1027, 1024), (700, 2600, 650)]


@pytest.mark.parametrize("M,K,N", LONG_SUM_CASES, ids=[f"{m}x{k}x{n}" for m, k, n in LONG_SUM_CASES])
def test_long_sums_stay_accurate(M, K, N, two_threads):
    g = torch.Generator().manual_seed(K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    expected = x.double() @ w.double().t() + b.double()
    error = (torch.ops.rnnkernels.linear(x, w, b).double() - expected).abs().max() / expected.abs().max()
    assert error <= 8e-7

"""The compiled CPU kernels agree with a float64 reference and with the PyTorch fallback."""

import faulthandler
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsurgery import gram, kernels

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason='the compiled kernels need Numba: pip install ".[fast]"'
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-24}


@pytest.fixture
def fallback(monkeypatch):
    """Run :mod:`gradsurgery.gram` on its PyTorch path."""
    monkeypatch.setenv("GRADSURGERY_KERNELS", "0")
    assert not kernels.available()


@st.composite
def blocks(draw, max_rows=10, max_columns=3 * kernels.COLUMNS + 5):
    """Rows of their own scale, some repeated, negated, zero or of rank one."""
    rows = draw(st.integers(1, max_rows))
    n = draw(st.one_of(st.integers(0, 64), st.integers(0, max_columns)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal((rows, n))
    kind = draw(st.sampled_from(["independent", "dependent", "positive"]))
    if kind == "dependent" and rows > 1:
        values = rng.standard_normal((rows, 1)) * values[:1]
        values[rng.integers(0, rows)] = 0.0
    if kind == "positive":
        values = np.abs(values)
    exponents = rng.integers(-15, 15, size=(rows, 1))
    return torch.from_numpy(values * 10.0**exponents).to(dtype)


def reference(block):
    wide = block.double()
    return wide @ wide.T


def assert_close_to_reference(result, block):
    exact = reference(block)
    norms = exact.diagonal().sqrt()
    n = max(block.shape[1], 1)
    # fp32 partial sums over whole chunks: a relative error far below sqrt(n)·eps.
    bound = 4 * EPS[block.dtype] * min(n, kernels.COLUMNS) ** 0.5 * norms[:, None] * norms
    assert result.dtype == torch.float64
    assert ((result - exact).abs() <= bound).all(), (result - exact).abs().max()


@settings(max_examples=60, deadline=None)
@given(blocks())
def test_gram_is_the_float64_product_to_fp32_accuracy(block):
    assert kernels.supports(block)
    result = kernels.gram(block)
    assert torch.equal(result, result.T)
    assert_close_to_reference(result, block)


@settings(max_examples=30, deadline=None)
@given(blocks())
def test_the_pytorch_fallback_agrees(block):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADSURGERY_KERNELS", "0")
        slow = gram.gram(block)
    fast = gram.gram(block)
    assert_close_to_reference(fast, block)
    assert_close_to_reference(slow, block)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_reach_the_gram_as_in_the_fallback(dtype, bad, monkeypatch):
    block = torch.randn(5, 3 * kernels.COLUMNS).to(dtype)
    block[3, kernels.COLUMNS + 7] = bad
    fast = kernels.gram(block)
    monkeypatch.setenv("GRADSURGERY_KERNELS", "0")
    slow = gram.gram(block)
    assert torch.equal(fast.isfinite(), slow.isfinite())
    assert not fast[3].isfinite().any()
    assert fast[[0, 1, 2, 4]][:, [0, 1, 2, 4]].isfinite().all()


def test_squares_that_overflow_fp32_are_inf_not_garbage():
    block = torch.full((2, 100), 1e20)
    assert torch.isinf(kernels.gram(block)).all()


def test_every_row_count_and_column_count_near_the_chunk_edges():
    for rows in range(1, 11):
        for n in (1, kernels.COLUMNS - 1, kernels.COLUMNS, kernels.COLUMNS + 1):
            block = torch.randn(rows, n)
            assert_close_to_reference(kernels.gram(block), block)


def test_threads_split_the_columns_and_agree(monkeypatch):
    block = torch.randn(4, 3 * kernels._PER_THREAD + 11)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert len(kernels._columns(block.shape[1])) == 1
    one = kernels.gram(block)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert len(kernels._columns(block.shape[1])) == 3
    three = kernels.gram(block)
    scale = one.diagonal().sqrt()
    assert ((three - one).abs() <= 1e-14 * scale[:, None] * scale).all()


def test_a_row_slice_of_the_flat_buffer_is_taken_and_a_column_slice_is_not():
    buffer = torch.randn(4, 1000)
    assert kernels.supports(buffer[1:])
    assert not kernels.supports(buffer[:, 1:])
    assert not kernels.supports(buffer.half())
    assert_close_to_reference(gram.gram(buffer[:, 1:]), buffer[:, 1:])


@st.composite
def combinations(draw):
    """``out``, rows, weights and ``accumulate``; up to 11 rows: groups of 4, 2 and 1."""
    rows = draw(st.integers(1, 11))
    n = draw(st.one_of(st.integers(1, 64), st.integers(1, 2 * kernels.COLUMNS + 3)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    exponents = rng.integers(-15, 15, size=(rows, 1))
    block = torch.from_numpy(rng.standard_normal((rows, n)) * 10.0**exponents).to(dtype)
    out = torch.from_numpy(rng.standard_normal(n) * 10.0 ** rng.integers(-15, 15)).to(dtype)
    weights = torch.from_numpy(rng.standard_normal(rows)).float()
    return out, block, weights, draw(st.booleans())


@settings(max_examples=80, deadline=None)
@given(combinations())
def test_the_combination_is_exact_to_its_accumulation_and_one_rounding(case):
    out, block, weights, accumulate = case
    result = out.clone()
    non_finite = kernels.combine_(result, block, weights, accumulate=accumulate, count=True)
    assert non_finite == int((~result.isfinite()).sum())
    w = weights.to(gram.compute_dtype(block.dtype)).double()
    exact = block.double().T @ w + (out.double() if accumulate else 0.0)
    terms = block.double().abs().T @ w.abs() + (out.double().abs() if accumulate else 0.0)
    # the final rounding to bf16 (half an ulp, 2^-9 relative) and the sum's own error
    rounding = 2.0**-8 if block.dtype == torch.bfloat16 else 0.0
    bound = rounding * exact.abs() + (block.shape[0] + 1) * 2 * EPS[block.dtype] * terms
    assert ((result.double() - exact).abs() <= bound).all()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADSURGERY_KERNELS", "0")
        slow = gram.combine_(out.clone(), block, weights, accumulate=accumulate)
    assert ((slow.double() - exact).abs() <= bound).all()


def test_bf16_rounding_is_pytorchs_round_to_nearest_even():
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[values.isfinite()]
    for weight in (1.0, 1 + 2.0**-9, 1 + 2.0**-8 + 2.0**-12, 3.0):
        result = torch.empty_like(values)
        kernels.combine_(result, values[None], torch.tensor([weight]), accumulate=False)
        expected = (values.float() * weight).bfloat16()  # exact product in fp32, one rounding
        same = ~expected.isnan()
        assert torch.equal(result[same].view(torch.int16), expected[same].view(torch.int16))
        assert torch.equal(result.isnan(), expected.isnan())


def test_bf16_combination_propagates_nan_and_overflows_to_inf():
    block = torch.ones(2, 40).bfloat16()
    block[0, 3] = float("nan")
    block[1, 5] = 3e38
    out = torch.zeros(40).bfloat16()
    assert kernels.combine_(out, block, torch.tensor([1.0, 4.0]), accumulate=False, count=True) == 2
    assert out[3].isnan() and out[5].isinf() and out[5] > 0
    assert torch.equal(out[[0, 1, 2]], torch.full((3,), 5.0).bfloat16())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_combination_counts_what_it_writes_not_finite(dtype):
    block = torch.ones(3, 3 * kernels.COLUMNS + 1).to(dtype)
    block[0, [7, kernels.COLUMNS]] = float("inf")
    block[2, 2 * kernels.COLUMNS + 3] = float("nan")
    block[1:, -1] = torch.finfo(dtype).max
    out = torch.empty(block.shape[1], dtype=dtype)
    weights = torch.tensor([1.0, 1.0, 1.0])
    assert kernels.combine_(out, block, weights, accumulate=False, count=True) == 4
    assert int((~out.isfinite()).sum()) == 4


def test_bf16_combination_is_the_same_split_over_threads(monkeypatch):
    block = torch.randn(3, 2 * kernels._PER_THREAD + 9).bfloat16()
    weights = torch.randn(3)
    start = torch.randn(block.shape[1]).bfloat16()
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        out = start.clone()
        kernels.combine_(out, block, weights, accumulate=True)
        results.append(out)
    assert torch.equal(results[0].view(torch.int16), results[1].view(torch.int16))


def test_switched_off_by_the_environment(fallback):
    block = torch.randn(3, 100)
    assert not kernels.supports(block)
    assert_close_to_reference(gram.gram(block), block)


def test_without_numba_the_library_uses_pytorch():
    script = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from gradsurgery import gram, kernels\n"
        "assert not kernels.available()\n"
        "x = torch.randn(3, 20000)\n"
        "exact = x.double() @ x.double().T\n"
        "scale = exact.diagonal().sqrt()\n"
        "assert ((gram.gram(x) - exact).abs() <= 1e-6 * scale[:, None] * scale).all()\n"
        "try:\n"
        "    kernels.gram(x)\n"
        "except ImportError as error:\n"
        "    assert 'Numba' in str(error)\n"
        "else:\n"
        "    raise AssertionError('kernels.gram ran without Numba')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_splits_over_threads_of_its_own(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    block = torch.randn(2, 2 * kernels._PER_THREAD + 1)
    expected = kernels.gram(block)  # the parent's pool now has threads
    child = os.fork()
    if child == 0:
        faulthandler.dump_traceback_later(30, exit=True)  # a dead pool would wait forever
        torch.set_num_threads(1)  # as DataLoader workers do: OpenMP's threads are gone too
        os._exit(0 if torch.equal(kernels.gram(block), expected) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_numba_that_fails_is_reported_once_and_pytorch_takes_over():
    script = (
        "import sys, types, warnings\n"
        "class Broken(types.ModuleType):\n"
        "    def __getattr__(self, name):\n"
        "        if name.startswith('__'):\n"
        "            raise AttributeError(name)\n"
        "        raise RuntimeError('cannot cache function: no locator available')\n"
        "sys.modules['numba'] = Broken('numba')\n"
        "import torch\n"
        "from gradsurgery import gram, kernels\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert not kernels.available() and not kernels.available()\n"
        "    x = torch.randn(2, 100)\n"
        "    exact = x.double() @ x.double().T\n"
        "    scale = exact.diagonal().sqrt()\n"
        "    assert ((gram.gram(x) - exact).abs() <= 1e-6 * scale[:, None] * scale).all()\n"
        "assert len(caught) == 1 and 'no locator' in str(caught[0].message), caught\n"
        "assert caught[0].category is RuntimeWarning\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("n", [1000, 10_007, 1_000_003])
@pytest.mark.parametrize("positive", [False, True])
def test_at_least_as_exact_as_pytorchs_gram(n, positive, monkeypatch):
    generator = torch.Generator().manual_seed(n)
    block = torch.randn(5, n, generator=generator)
    block = block.abs() if positive else block
    exact = reference(block)
    norms = exact.diagonal().sqrt()

    def error(result):
        return float(((result - exact).abs() / (norms[:, None] * norms)).max())

    fast = error(kernels.gram(block))
    monkeypatch.setenv("GRADSURGERY_KERNELS", "0")
    assert fast <= error(gram.gram(block))
    if n >= 10_000:  # chunk sums in float64: the error shrinks as chunks add up
        assert fast <= 1e-7


def test_what_the_kernels_would_read_or_write_out_of_bounds_is_refused():
    block = torch.randn(3, 50)
    out = torch.randn(50)
    before = out.clone()
    refused = [
        lambda: kernels.gram(block.half()),
        lambda: kernels.gram(block[:, ::2]),
        lambda: kernels.combine_(out[:40], block, torch.ones(3), accumulate=True),
        lambda: kernels.combine_(out.double(), block, torch.ones(3), accumulate=True),
        lambda: kernels.combine_(torch.randn(100)[::2], block, torch.ones(3), accumulate=True),
        lambda: kernels.combine_(out, block, torch.ones(4), accumulate=True),
        lambda: kernels.segment_gram(block, np.array([0, 20, 60], dtype=np.int64)),
        lambda: kernels.segment_gram(block, np.array([0, 30, 20, 50], dtype=np.int64)),
        lambda: kernels.segment_gram(block, np.array([0, 50], dtype=np.int32)),
        lambda: kernels.combine_segments_(
            out, block, torch.ones(3, 3), np.array([0, 20, 50], dtype=np.int64)
        ),
    ]
    for call in refused:
        with pytest.raises(ValueError, match=r"kernels take|must"):
            call()
    assert torch.equal(out, before)
    bounds = np.array([0, 20, 20, 50], dtype=np.int64)
    expected = torch.stack(
        [reference(block[:, :20]), reference(block[:, :0]), reference(block[:, 20:])]
    )
    for segment, exact in zip(kernels.segment_gram(block, bounds), expected, strict=True):
        norms = exact.diagonal().sqrt()
        assert ((segment - exact).abs() <= 1e-6 * norms[:, None] * norms).all()
    kernels.combine_segments_(out, block, torch.ones(3, 3), bounds)
    torch.testing.assert_close(out, block.sum(dim=0))

"""Per-parameter Grams and combinations, chunked, against a loop over the segments."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradsurgery import kernels
from gradsurgery import segments as seg
from gradsurgery.gram import compute_dtype


@pytest.fixture(params=["kernels", "pytorch"])
def path(request, monkeypatch):
    """Both ways of computing: the compiled kernels (where Numba is installed), PyTorch's."""
    if request.param == "pytorch":
        monkeypatch.setenv("GRADSURGERY_KERNELS", "0")
    elif not kernels.available():
        pytest.skip('the compiled kernels need Numba: pip install ".[fast]"')
    return request.param


@st.composite
def blocks(draw):
    """A (r, n) block cut into segments, and a chunk size that cuts across them."""
    length = st.integers(0, 40) | st.just(kernels.COLUMNS + 3)  # across a kernel chunk
    lengths = draw(st.lists(length, min_size=1, max_size=8))
    rows = draw(st.integers(1, 10))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    columns = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(rows, sum(lengths), generator=generator).to(dtype)
    weights = torch.randn(len(lengths), rows, generator=generator, dtype=torch.float64)
    return block, lengths, columns, weights


def pieces(block, lengths):
    return torch.split(block.double(), lengths, dim=1)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=blocks())
def test_segment_gram_is_each_segments_gram(case, path):
    block, lengths, columns, _ = case
    segments = seg.Segments(lengths, block.device, columns)
    expected = torch.stack([piece @ piece.T for piece in pieces(block, lengths)])
    norms = expected.diagonal(dim1=1, dim2=2).sqrt()
    # fp32 sums (bf16 widens exactly): off by a few eps·sqrt(terms) of the norms' product
    eps = 2.0**-53 if block.dtype == torch.float64 else 2.0**-24
    bound = 4 * eps * max(lengths) ** 0.5 * norms[:, :, None] * norms[:, None, :]
    assert ((seg.segment_gram(block, segments) - expected).abs() <= bound).all()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=blocks())
def test_combine_segments_weights_each_segment_by_its_own_row(case, path):
    block, lengths, columns, weights = case
    segments = seg.Segments(lengths, block.device, columns)
    out = torch.full((block.shape[1],), float("nan"), dtype=block.dtype)
    seg.combine_segments_(out, block, weights, segments)
    w = weights.to(compute_dtype(block.dtype)).double()
    parts = list(zip(pieces(block, lengths), w, strict=True))
    expected = torch.cat([piece.T @ row for piece, row in parts])
    terms = torch.cat([piece.abs().T @ row.abs() for piece, row in parts])
    eps = 2.0**-53 if block.dtype == torch.float64 else 2.0**-24
    rounding = 2.0**-8 if block.dtype == torch.bfloat16 else 0.0  # the final bf16 write
    bound = rounding * expected.abs() + 2 * (block.shape[0] + 1) * eps * terms
    assert ((out.double() - expected).abs() <= bound).all()


def test_pieces_are_cut_at_every_multiple_of_the_chunk():
    """Each product covers at most one chunk of columns, whatever the parameters' sizes."""
    columns = seg.COLUMNS
    segments = seg.Segments([3 * columns + 5, 7, columns], torch.device("cpu"))
    spans = [(piece.start, piece.stop, s) for piece, s in segments.pieces]
    assert spans == [
        (0, columns, 0),
        (columns, 2 * columns, 0),
        (2 * columns, 3 * columns, 0),
        (3 * columns, 3 * columns + 5, 0),
        (3 * columns + 5, 3 * columns + 12, 1),
        (3 * columns + 12, 4 * columns, 2),
        (4 * columns, 4 * columns + 12, 2),
    ]
    assert segments.owner.tolist() == [s for *_, s in spans]


def test_segment_lengths_and_chunks_are_validated():
    with pytest.raises(ValueError, match="non-negative"):
        seg.Segments([4, -1, 2], torch.device("cpu"))
    with pytest.raises(ValueError, match="positive"):
        seg.Segments([4], torch.device("cpu"), columns=0)

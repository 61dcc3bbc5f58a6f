"""Per-parameter Grams and combinations, chunked, against a loop over the segments."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery import segments as seg


@st.composite
def blocks(draw):
    """A (r, n) block cut into segments, and a chunk size that cuts across them."""
    lengths = draw(st.lists(st.integers(0, 40), min_size=1, max_size=8))
    rows = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    columns = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(rows, sum(lengths), generator=generator).to(dtype)
    weights = torch.randn(len(lengths), rows, generator=generator, dtype=torch.float64)
    return block, lengths, columns, weights


def pieces(block, lengths):
    return torch.split(block.double(), lengths, dim=1)


@given(case=blocks())
def test_segment_gram_is_each_segments_gram(case):
    block, lengths, columns, _ = case
    segments = seg.Segments(lengths, block.device, columns)
    expected = torch.stack([piece @ piece.T for piece in pieces(block, lengths)])
    torch.testing.assert_close(seg.segment_gram(block, segments), expected, rtol=1e-5, atol=1e-5)


@given(case=blocks())
def test_combine_segments_weights_each_segment_by_its_own_row(case):
    block, lengths, columns, weights = case
    segments = seg.Segments(lengths, block.device, columns)
    out = torch.full((block.shape[1],), float("nan"), dtype=block.dtype)
    seg.combine_segments_(out, block, weights, segments)
    expected = torch.cat(
        [piece.T @ w for piece, w in zip(pieces(block, lengths), weights, strict=True)]
    )
    tolerance = 1e-2 if block.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


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

"""Linear CKA against an independent HSIC formula, and the CKAMonitor's trend."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurgery.similarity import CKAMonitor, linear_cka
from tests.encoders import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels and H = I − 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


@given(
    n=st.integers(2, 24),
    dx=st.integers(1, 30),
    dy=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    noise=st.floats(0.0, 3.0),
)
def test_agrees_with_the_hsic_formula(n, dx, dy, seed, noise):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=generator, dtype=torch.float64)
    mix = torch.randn(dx, dy, generator=generator, dtype=torch.float64)
    y = x @ mix + noise * torch.randn(n, dy, generator=generator, dtype=torch.float64)
    expected = hsic_cka(x.numpy(), y.numpy())
    value = linear_cka(x, y)
    assert value.dtype == torch.float64 and value.dim() == 0
    assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert -1e-12 <= float(value) <= 1 + 1e-12


def test_invariances_and_float32():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 16, generator=generator)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(linear_cka(x, 3 * x @ q + 5)) == pytest.approx(1.0, abs=1e-5)
    y = torch.randn(4, 7, 9, generator=generator)
    flat = float(linear_cka(x.reshape(28, 16).double(), y.reshape(28, 9).double()))
    assert float(linear_cka(x, y)) == pytest.approx(flat, rel=1e-5)  # tokens as examples
    assert linear_cka(x.bfloat16(), y.bfloat16()).dtype == torch.float32


def test_bad_shapes():
    with pytest.raises(ValueError, match="same leading dimensions"):
        linear_cka(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="same leading dimensions"):
        linear_cka(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="at least two examples"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))


def drifting(scales, seed=0):
    """Representations of the same batch that drift from the pre-trained ones by ``scales``."""
    generator = torch.Generator().manual_seed(seed)
    before = [torch.randn(32, 6, generator=generator) for _ in range(2)]
    noise = [torch.randn(32, 6, generator=generator) for _ in range(2)]
    for scale in scales:
        yield [b + scale * n for b, n in zip(before, noise, strict=True)], before


def test_the_monitor_says_whether_the_similarity_still_drops():
    monitor = CKAMonitor(window=3)
    scales = [0.1 * k for k in range(1, 11)] + [1.0] * 10
    recorded, dropping = [], []
    for now, before in drifting(scales):
        value = monitor.observe(now, before)
        expected = np.mean([float(linear_cka(a, b)) for a, b in zip(now, before, strict=True)])
        assert value == pytest.approx(expected, rel=1e-6) and monitor.similarity == value
        recorded.append(value)
        dropping.append(monitor.dropping)
    for t in range(len(scales)):
        if t + 1 < 6:
            assert not dropping[t]
        else:
            recent, previous = np.mean(recorded[t - 2 : t + 1]), np.mean(recorded[t - 5 : t - 2])
            assert dropping[t] == (previous - recent > 0)
    assert dropping[5] and not dropping[-1]  # drifting away, then settled
    assert monitor.observations == len(scales)


def test_a_threshold_needs_a_larger_drop():
    strict = CKAMonitor(window=2, threshold=0.5)
    for now, before in drifting([0.1, 0.2, 0.3, 0.4]):
        strict.observe(now, before)
    assert not strict.dropping


def test_bad_observations_record_nothing():
    monitor = CKAMonitor(window=2)
    for now, before in drifting([0.1, 0.2, 0.3]):
        monitor.observe(now, before)
    state = monitor.state_dict()
    constant = torch.ones(32, 6)
    with pytest.raises(ValueError, match="similarity must be finite"):
        monitor.observe(constant, torch.randn(32, 6))
    with pytest.raises(ValueError, match="same layers"):
        monitor.observe([torch.randn(32, 6)], [])
    with pytest.raises(ValueError, match="same leading dimensions"):
        monitor.observe(torch.randn(32, 6), torch.randn(31, 6))
    assert monitor.state_dict() == state


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"window": 0}, "window must be a positive int"), ({"threshold": -1}, "threshold must be")],
)
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        CKAMonitor(**settings)


def test_save_and_resume(tmp_path):
    scales = [0.1 * k for k in range(1, 9)]
    monitor, resumed = CKAMonitor(window=2), CKAMonitor(window=2)
    pairs = list(drifting(scales))
    for now, before in pairs[:5]:
        monitor.observe(now, before)
    torch.save(monitor.state_dict(), tmp_path / "monitor.pt")
    resumed.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    assert resumed.similarity == monitor.similarity
    for now, before in pairs[5:]:
        assert resumed.observe(now, before) == monitor.observe(now, before)
        assert resumed.dropping == monitor.dropping
    with pytest.raises(ValueError, match="window 2, this one has window 3"):
        CKAMonitor(window=3).load_state_dict(monitor.state_dict())
    assert repr(monitor) == "CKAMonitor(window=2, threshold=0.0)"

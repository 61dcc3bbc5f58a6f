"""PhaseDetector: the phase, φ and R(φ) of Guo et al. (2023) on synthetic loss curves."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from gradsurgery.phases import Phase, PhaseDetector


def reference(losses, window, threshold, exponent):
    """φ and R(φ) of docs/phased_lr.md after the last loss, computed independently with numpy."""
    if len(losses) < 2 * window:
        return Phase.P1, None, None
    recent = np.mean(np.asarray(losses[-window:], dtype=np.float64))
    previous = np.mean(np.asarray(losses[-2 * window : -window], dtype=np.float64))
    phase = Phase.P1 if previous - recent > threshold else Phase.P2
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = float(np.float64(recent) / np.float64(previous)) if previous else None
    if ratio is None:
        ratio = 1.0 if recent == 0 else math.inf
    return phase, ratio, max(1.0 - ratio**exponent, 0.0) if ratio < 1 else 0.0


def run(losses, **settings):
    """Observe ``losses`` one by one; return (phase, φ, R) after each."""
    detector = PhaseDetector(**settings)
    readings = []
    for loss in losses:
        detector.observe(loss)
        readings.append((detector.phase, detector.ratio, detector.adaptive_multiplier))
    return readings


def assert_matches_formulas(losses, window=100, threshold=0.1, exponent=3.0):
    readings = run(losses, window=window, threshold=threshold, exponent=exponent)
    for t, (phase, ratio, adaptive) in enumerate(readings):
        expected_phase, expected_ratio, expected_adaptive = reference(
            losses[: t + 1], window, threshold, exponent
        )
        assert phase is expected_phase, t
        if expected_ratio is None:
            assert ratio is None and adaptive is None
        else:
            assert ratio == pytest.approx(expected_ratio, rel=1e-12)
            assert adaptive == pytest.approx(expected_adaptive, rel=1e-9, abs=1e-12)
    return readings


STEPS = np.arange(600)
CURVES = {
    "fast drop then slow": 3.0 * np.exp(-STEPS / 60) + 0.2,
    "plateau": np.full(600, 0.7),
    "rising": 0.5 + 0.002 * STEPS,
    "noisy drop": np.abs(
        2.0 * np.exp(-STEPS / 120) + 0.3 + 0.1 * np.random.default_rng(0).standard_normal(600)
    ),
}


@pytest.mark.parametrize("name", CURVES)
def test_synthetic_curves_give_the_formulas(name):
    readings = assert_matches_formulas(CURVES[name].tolist())
    phases = [phase for phase, _, _ in readings]
    assert phases[:199] == [Phase.P1] * 199  # until both windows are full
    if name == "fast drop then slow":
        switch = phases.index(Phase.P2)
        assert 199 < switch < 599 and set(phases[switch:]) == {Phase.P2}
        assert 1 > readings[switch][2] > readings[-1][2] > 0  # R falls as the loss flattens
    if name == "plateau":
        assert set(phases[199:]) == {Phase.P2}
        assert all(ratio == 1.0 and adaptive == 0.0 for _, ratio, adaptive in readings[199:])
    if name == "rising":
        assert set(phases[199:]) == {Phase.P2}
        assert all(ratio > 1 and adaptive == 0.0 for _, ratio, adaptive in readings[199:])
    if name == "noisy drop":
        assert {Phase.P1, Phase.P2} <= set(phases[199:])


@given(
    losses=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40),
    window=st.integers(1, 6),
    threshold=st.floats(0.0, 1.0),
    exponent=st.floats(0.1, 5.0),
)
def test_any_loss_curve_gives_the_formulas(losses, window, threshold, exponent):
    # a mean that lands exactly on the threshold may round either way
    for t in range(2 * window, len(losses) + 1):
        a, b = np.mean(losses[t - window : t]), np.mean(losses[t - 2 * window : t - window])
        assume(abs((b - a) - threshold) > 1e-9)
    assert_matches_formulas(losses, window, threshold, exponent)


def test_phase_one_needs_a_drop_larger_than_the_threshold():
    # exactly representable values: L̄_b − L̄_a equals δ exactly, which is not "> δ"
    assert run([1, 1, 0.75, 0.75], window=2, threshold=0.25)[-1][0] is Phase.P2
    assert run([1, 1, 0.5, 0.5], window=2, threshold=0.25)[-1][0] is Phase.P1
    phase, ratio, adaptive = run([1, 1, 0.5, 0.5, 0.5, 0.5], window=2, threshold=0.25)[-1]
    assert (phase, ratio, adaptive) == (Phase.P2, 1.0, 0.0)
    phase, ratio, adaptive = run([4, 4, 2, 2], window=2, threshold=5.0, exponent=2.0)[-1]
    assert (phase, ratio, adaptive) == (Phase.P2, 0.5, 0.75)


def test_zero_and_huge_losses_have_defined_ratios():
    assert run([0, 0, 0, 0], window=2)[-1] == (Phase.P2, 1.0, 0.0)
    assert run([0, 0, 1, 1], window=2)[-1] == (Phase.P2, math.inf, 0.0)
    assert run([1e-300, 1e300], window=1)[-1] == (Phase.P2, math.inf, 0.0)
    assert run([1e300, 1e-300], window=1)[-1][2] == 1.0


def test_tensors_and_numbers_are_observed_alike():
    losses = [2.5, 2.0, 1.25, 1.0, 0.5]
    as_tensors = [torch.tensor(loss, requires_grad=True) * 1 for loss in losses]
    as_ints_and_numpy = [np.float32(2.5), 2, 1.25, 1, np.float64(0.5)]
    expected = run(losses, window=2)
    assert run(as_tensors, window=2) == expected
    assert run(as_ints_and_numpy, window=2) == expected


class CountHostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == "aten._local_scalar_dense.default":
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_a_tensor_loss_is_read_once():
    detector = PhaseDetector(window=1)
    losses = [torch.tensor(value) for value in (3.0, 2.0, 1.0)]
    with CountHostReads() as counter:
        for loss in losses:
            detector.observe(loss)
            readings = (detector.phase, detector.ratio, detector.adaptive_multiplier)
    assert counter.reads == 3
    assert readings == (Phase.P1, 0.5, 0.875)


BAD_LOSSES = [
    float("nan"),
    float("inf"),
    -float("inf"),
    -0.5,
    torch.tensor(float("nan")),
    torch.tensor([1.0, 2.0]),
    torch.tensor([1.0]),
    True,
    "0.5",
    None,
]


@pytest.mark.parametrize("loss", BAD_LOSSES, ids=repr)
def test_bad_losses_raise_and_record_nothing(loss):
    detector = PhaseDetector(window=2)
    for value in (3.0, 2.0, 1.0):
        detector.observe(value)
    before = detector.state_dict()
    with pytest.raises(ValueError, match="loss must be"):
        detector.observe(loss)
    assert detector.state_dict() == before
    assert detector.observations == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window": 0}, "window must be a positive int"),
        ({"window": 2.5}, "window must be a positive int"),
        ({"window": True}, "window must be a positive int"),
        ({"threshold": -0.1}, r"threshold must be a finite number ≥ 0"),
        ({"threshold": float("nan")}, r"threshold must be a finite number ≥ 0"),
        ({"threshold": float("inf")}, r"threshold must be a finite number ≥ 0"),
        ({"exponent": 0}, r"exponent must be a finite number > 0"),
        ({"exponent": -3.0}, r"exponent must be a finite number > 0"),
        ({"exponent": "3"}, r"exponent must be a finite number > 0"),
    ],
)
def test_bad_settings_say_what_is_allowed(settings, message):
    with pytest.raises(ValueError, match=message):
        PhaseDetector(**settings)


def test_save_and_resume_mid_window_gives_the_same_readings(tmp_path):
    losses = CURVES["noisy drop"][:40].tolist()
    uninterrupted = run(losses, window=6)
    detector = PhaseDetector(window=6)
    for loss in losses[:17]:  # mid-window: 17 = 2·6 + 5
        detector.observe(loss)
    torch.save(detector.state_dict(), tmp_path / "detector.pt")
    resumed = PhaseDetector(window=6)
    resumed.load_state_dict(torch.load(tmp_path / "detector.pt", weights_only=True))
    assert resumed.observations == 17
    readings = []
    for loss in losses[17:]:
        resumed.observe(loss)
        readings.append((resumed.phase, resumed.ratio, resumed.adaptive_multiplier))
    assert readings == uninterrupted[17:]
    assert {phase for phase, _, _ in readings} == {Phase.P1, Phase.P2}


@pytest.mark.parametrize(
    "state",
    [
        {"window": 3, "count": 2, "values": [1.0, 2.0]},
        {"window": 2, "count": 5, "values": [1.0, 2.0]},
        {"window": 2, "count": 2, "values": [1.0, float("nan")]},
        {"window": 2, "count": "2", "values": [1.0, 2.0]},
    ],
)
def test_loading_a_bad_state_changes_nothing(state):
    detector = PhaseDetector(window=2)
    for value in (3.0, 2.0, 1.0):
        detector.observe(value)
    before = detector.state_dict()
    with pytest.raises(ValueError):
        detector.load_state_dict(state)
    assert detector.state_dict() == before


def test_repr_shows_the_settings():
    assert repr(PhaseDetector(50, 0.2, 2)) == (
        "PhaseDetector(window=50, threshold=0.2, exponent=2.0)"
    )

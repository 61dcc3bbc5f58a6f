"""Exceptions raised when a step cannot be carried out as asked.

Every wrapper raises them *before* it changes anything: parameters, gradients and
optimizer state are left as they were, so the caller may fix the input and retry.
"""

from __future__ import annotations

__all__ = ["NonFiniteGradientError", "ParetoStationaryError", "SolverError"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient (task, constraint or objective) holds NaN or Inf values.

    With ``torch.amp.GradScaler`` such steps are skipped instead (pass the scaler to the
    wrapper); without one, a NaN or Inf gradient is a bug upstream (a diverged loss, a bad
    batch) that projecting would only hide.
    """


class SolverError(RuntimeError):
    """The quadratic program of a step could not be solved to the required accuracy."""


class ParetoStationaryError(RuntimeError):
    """LF-MLF reached a Pareto-stationary point and was asked to stop (``on_stationary="raise"``).

    No common descent direction of the objectives is left: the min-norm point of their
    gradients' convex hull is (numerically) zero.
    """

r"""Whether the last layers' representations still move away from the pre-trained model's.

Guo et al. (ACL 2023, Section 3.2 and Appendix D) apply policy IV (the learning rate of the
last layers' attention weights times :math:`c_2`) in the second phase only while the
representations of the last layers on the current batch keep becoming less similar to those
of the pre-trained model, measured with linear CKA (Kornblith et al., 2019):

.. math::

    \operatorname{CKA}(X, Y) = \frac{\lVert Y_c^\top X_c \rVert_F^2}
        {\lVert X_c^\top X_c \rVert_F \, \lVert Y_c^\top Y_c \rVert_F},

where :math:`X, Y` hold the same :math:`n` examples (tokens) as rows and :math:`X_c, Y_c`
are centred column by column. :class:`CKAMonitor` averages it over the last layers and
says the similarity is still dropping while its mean over the last :math:`W` observations
is lower than over the :math:`W` before by more than a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradsurgery.checks import finite_number
from gradsurgery.gram import ieee_fp32_matmul
from gradsurgery.phases import TwoWindows

__all__ = ["CKAMonitor", "linear_cka"]


def _centred_rows(features: Tensor) -> Tensor:
    rows = features.reshape(-1, features.shape[-1])
    if rows.dtype != torch.float64:
        rows = rows.float()
    return rows - rows.mean(dim=0, keepdim=True)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA between two representations of the same examples, as a 0-d tensor.

    Args:
        x: ``(..., d_x)``: one row per example (all leading dimensions are flattened, so
            ``(batch, tokens, hidden)`` hidden states compare token by token; select the
            non-padding tokens first if the batch is padded).
        y: ``(..., d_y)`` with the same leading dimensions (moved to ``x``'s device).

    Returns:
        A value in ``[0, 1]``, computed in float32 (float64 for float64 inputs); NaN if a
        representation is constant over the examples.

    Raises:
        ValueError: the leading dimensions differ, or fewer than two examples.
    """
    if x.shape[:-1] != y.shape[:-1] or x.dim() < 2:
        raise ValueError(
            f"x and y must be (..., features) with the same leading dimensions, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    xc, yc = _centred_rows(x), _centred_rows(y.to(x.device))
    if xc.shape[0] < 2:
        raise ValueError("linear CKA needs at least two examples")
    dtype = torch.promote_types(xc.dtype, yc.dtype)
    xc, yc = xc.to(dtype), yc.to(dtype)
    with ieee_fp32_matmul():
        if xc.shape[0] >= max(xc.shape[1], yc.shape[1]):
            numerator = (yc.T @ xc).square().sum()
            norm_x, norm_y = (xc.T @ xc).norm(), (yc.T @ yc).norm()
        else:  # fewer examples than features: the same quantities from n × n Grams
            gram_x, gram_y = xc @ xc.T, yc @ yc.T
            numerator = (gram_x * gram_y).sum()
            norm_x, norm_y = gram_x.norm(), gram_y.norm()
    cka: Tensor = numerator / (norm_x * norm_y)
    return cka


class CKAMonitor:
    """Track the linear CKA of the last layers against the pre-trained model's, batch by batch.

    .. code-block:: python

        monitor = CKAMonitor(window=10)
        now = model(**batch, output_hidden_states=True).hidden_states[-2:]
        with torch.no_grad():
            before = pretrained(**batch, output_hidden_states=True).hidden_states[-2:]
        monitor.observe(now, before)
        monitor.dropping          # True while the similarity still falls

    Observe as often as you like (every step, or every k steps to save the pre-trained
    model's forward pass): the windows count observations.

    Args:
        window: :math:`W`, observations per window (10).
        threshold: the similarity is dropping while the previous window's mean exceeds the
            recent one's by more than this (0: any drop).

    Raises:
        ValueError: ``window`` not a positive int, or ``threshold`` not a finite number ≥ 0.
    """

    def __init__(self, window: int = 10, threshold: float = 0.0) -> None:
        self.threshold = finite_number(threshold, "threshold", low=0.0)
        self._similarities = TwoWindows(window, "similarity")

    @property
    def window(self) -> int:
        """:math:`W`."""
        return self._similarities.window

    def observe(
        self, current: Tensor | Sequence[Tensor], pretrained: Tensor | Sequence[Tensor]
    ) -> float:
        """Record the mean linear CKA of each layer's pair of representations; return it.

        Args:
            current: the model's hidden states of the monitored layers on this batch (one
                tensor per layer, or one tensor for one layer).
            pretrained: the pre-trained model's hidden states of the same layers on the same
                batch.

        Raises:
            ValueError: different numbers of layers, mismatched shapes, or a similarity
                that is not finite (a constant representation); nothing is recorded.
        """
        now = [current] if isinstance(current, Tensor) else list(current)
        before = [pretrained] if isinstance(pretrained, Tensor) else list(pretrained)
        if not now or len(now) != len(before):
            raise ValueError(
                f"current and pretrained must hold the same layers, got {len(now)} and "
                f"{len(before)} tensors"
            )
        with torch.no_grad():
            mean = torch.stack([linear_cka(x, y) for x, y in zip(now, before, strict=True)]).mean()
        return self._similarities.push(mean)

    @property
    def similarity(self) -> float | None:
        """The similarity observed last (``None`` before the first observation)."""
        return self._similarities.last

    @property
    def observations(self) -> int:
        """How many similarities were observed."""
        return self._similarities.count

    @property
    def dropping(self) -> bool:
        """Whether the similarity is still dropping (``False`` until ``2W`` observations).

        That is, whether its mean fell by more than the threshold from the previous window
        to the recent one.
        """
        drop = self._similarities.drop()
        return drop is not None and drop > self.threshold

    def state_dict(self) -> dict[str, Any]:
        """The similarity history."""
        return self._similarities.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a history saved by :meth:`state_dict` from a monitor with this window.

        Raises:
            ValueError: saved with another window, or not a valid history; nothing changes.
        """
        self._similarities.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window}, threshold={self.threshold})"

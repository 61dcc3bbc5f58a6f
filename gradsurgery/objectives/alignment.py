r"""Cross-lingual alignment loss (Cao et al., 2020, as used by Efimov et al., 2022).

For word pairs :math:`(s_i, t_i)` linked by a word aligner in parallel sentences, with
:math:`f` the current model's contextual word vector (the mean of the word's last-layer
sub-word vectors) and :math:`f^0` that of the frozen original model,

.. math::

    L_{\text{align}} = w_{\text{pull}} \operatorname{MSE}_i\big(f(s_i), f(t_i)\big)
                     + w_{\text{stay}} \operatorname{MSE}_j\big(f(s_j), f^0(s_j)\big),

where the pull term runs over the aligned pairs and the stay term over every word
:math:`s_j` of the source sentences (English in the papers), and
:math:`\operatorname{MSE}_i(a_i, b_i) = \frac{1}{n d} \sum_i \lVert a_i - b_i \rVert^2`
with :math:`d` the hidden size, as ``torch.nn.MSELoss`` computes it. The weights default to
the study's public code: :math:`w_{\text{pull}} = 0.01`, :math:`w_{\text{stay}} = 1`. The
pull term uses the current model on both sides; the frozen model runs without gradients
and is never updated. In "continual" fine-tuning the loss is added to the task loss,
:math:`L = L_{\text{task}} + \alpha L_{\text{align}}` with :math:`\alpha = 0.01`
(:func:`~gradsurgery.objectives.auxiliary_loss`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.functional import mse_loss

from gradsurgery.checks import finite_number
from gradsurgery.data.encoding import ParallelBatch, WordEncoding
from gradsurgery.objectives.encoders import evaluating, last_hidden_state
from gradsurgery.objectives.pooling import word_pool

__all__ = ["DEFAULT_PULL_WEIGHT", "DEFAULT_STAY_WEIGHT", "alignment_loss", "word_vectors"]

DEFAULT_PULL_WEIGHT = 0.01
"""Weight of the pull term :math:`\\lVert f(s_i) - f(t_i) \\rVert^2` (Efimov et al.'s code)."""

DEFAULT_STAY_WEIGHT = 1.0
"""Weight of the stay term :math:`\\lVert f(s_j) - f^0(s_j) \\rVert^2` (Efimov et al.'s code)."""


def word_vectors(model: nn.Module, encoding: WordEncoding) -> Tensor:
    """``(num_words, hidden)``: each word's mean last-layer sub-word vector."""
    hidden = last_hidden_state(model, encoding.input_ids, encoding.attention_mask)
    return word_pool(hidden, encoding.word_index, encoding.num_words)


def _mse(first: Tensor, second: Tensor) -> Tensor:
    if first.shape[0] == 0:  # no word: nothing to pull (MSE of nothing would be NaN)
        return first.sum() * 0.0
    return mse_loss(first.float(), second.float())


def alignment_loss(
    model: nn.Module,
    frozen: nn.Module,
    batch: ParallelBatch,
    *,
    pull_weight: float = DEFAULT_PULL_WEIGHT,
    stay_weight: float = DEFAULT_STAY_WEIGHT,
) -> Tensor:
    r"""The alignment loss of ``batch``, a 0-d tensor (see the module's equation).

    Args:
        model: the model being fine-tuned (its encoder's last layer).
        frozen: the original model :math:`f^0`, e.g.
            :func:`~gradsurgery.objectives.frozen_copy` made before fine-tuning; it runs
            in eval mode under ``torch.no_grad`` (its modes are restored afterwards).
        batch: sentence pairs with word alignments, from a
            :class:`~gradsurgery.data.ParallelCollator`.
        pull_weight: :math:`w_{\text{pull}} ≥ 0`.
        stay_weight: :math:`w_{\text{stay}} ≥ 0`.

    Returns:
        0 when ``model`` equals ``frozen`` and every linked pair has the same vector;
        a batch without links contributes no pull term.

    Raises:
        ValueError: a negative or non-finite weight, ``frozen is model``, or the frozen
            copy on another device than the model.
    """
    pull_weight = finite_number(pull_weight, "pull_weight", low=0)
    stay_weight = finite_number(stay_weight, "stay_weight", low=0)
    if frozen is model:
        raise ValueError("frozen must be a copy of the model (frozen_copy(model)), not the model")
    device, frozen_device = (next(m.parameters()).device for m in (model, frozen))
    if device != frozen_device:
        raise ValueError(
            f"the model is on {device} and its frozen copy on {frozen_device}: "
            "move the model first, then make frozen_copy(model), or move the copy too"
        )
    source = word_vectors(model, batch.source)
    target = word_vectors(model, batch.target)
    with evaluating(frozen):
        original = word_vectors(frozen, batch.source)
    pull = _mse(source[batch.source_words], target[batch.target_words])
    stay = _mse(source, original)
    return pull_weight * pull + stay_weight * stay

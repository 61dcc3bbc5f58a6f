"""The encoder inside a transformers model: its last layer, a shared copy, a frozen copy.

Every objective runs the *encoder* of the model it is given (``model.base_model`` for a
transformers model with a head, e.g. ``BertForTokenClassification.bert``), so a task model,
a masked-LM model and a bare encoder can all be passed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = ["encoder_of", "evaluating", "frozen_copy", "last_hidden_state", "share_encoder"]

M = TypeVar("M", bound=nn.Module)


def encoder_of(model: nn.Module) -> nn.Module:
    """``model.base_model`` when ``model`` has one (any transformers model), else ``model``."""
    encoder = getattr(model, "base_model", model)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"{type(model).__name__}.base_model is not a torch.nn.Module")
    return encoder


def last_hidden_state(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The ``(batch, length, hidden)`` output of the encoder's last layer.

    The encoder is ``model.base_model`` when ``model`` has one (any transformers model),
    else ``model`` itself; it is called with ``input_ids`` and ``attention_mask`` and must
    return the hidden states, as a tensor or as ``.last_hidden_state``.

    Raises:
        TypeError: the encoder returns neither.
    """
    outputs = encoder_of(model)(input_ids=input_ids, attention_mask=attention_mask)
    hidden = outputs if isinstance(outputs, Tensor) else getattr(outputs, "last_hidden_state", None)
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise TypeError(
            f"the encoder of {type(model).__name__} must return (batch, length, hidden) hidden "
            "states, as a tensor or as .last_hidden_state"
        )
    return hidden


def share_encoder(head_model: M, encoder_model: nn.Module) -> M:
    """Make ``head_model`` run on ``encoder_model``'s encoder (in place), and return it.

    The usual set-up for a masked-LM memory objective: the task model being fine-tuned and
    an MLM model loaded from the same checkpoint share one encoder, so the MLM loss is the
    loss of the model being trained; only the MLM head (its transform and bias) is the MLM
    model's own. The output embeddings are tied again to the shared input embeddings when
    the model ties them (``config.tie_word_embeddings``).

    The shared encoder may have parameters that ``head_model``'s own encoder lacks: a
    sequence-classification model's encoder has a pooler, which an MLM model does not use
    (the MLM loss leaves the pooler without gradient; it is computed and ignored).

    .. code-block:: python

        task = AutoModelForSequenceClassification.from_pretrained(name, num_labels=3)
        mlm = share_encoder(AutoModelForMaskedLM.from_pretrained(name), task)
        params = list(dict.fromkeys([*task.parameters(), *mlm.parameters()]))

    Raises:
        ValueError: ``head_model`` has no base model (``base_model_prefix``), the two
            encoders are of different types, or ``encoder_model``'s lacks a parameter of
            ``head_model``'s or has it with another shape (the message names it).
    """
    prefix = getattr(head_model, "base_model_prefix", "")
    own = getattr(head_model, prefix, None) if prefix else None
    if not isinstance(own, nn.Module) or own is head_model:
        raise ValueError(
            f"{type(head_model).__name__} has no base model to replace: pass a transformers "
            "model with a head (e.g. BertForMaskedLM)"
        )
    shared = encoder_of(encoder_model)
    head_name, encoder_name = type(head_model).__name__, type(encoder_model).__name__
    if type(shared) is not type(own):
        raise ValueError(
            f"the encoders differ: {head_name} has a {type(own).__name__}, {encoder_name} a "
            f"{type(shared).__name__}; share an encoder between models of one architecture"
        )
    available = dict(shared.named_parameters())
    for name, param in own.named_parameters():
        other = available.get(name)
        if other is None:
            raise ValueError(
                f"the encoders differ: {head_name}'s {type(own).__name__} has {name}, which "
                f"{encoder_name}'s lacks (e.g. a pooler: build {encoder_name} with it, or "
                f"share the encoder the other way round)"
            )
        if other.shape != param.shape:
            raise ValueError(
                f"the encoders differ: {name} is {tuple(param.shape)} in {head_name} and "
                f"{tuple(other.shape)} in {encoder_name}; were they built from one config?"
            )
    setattr(head_model, prefix, shared)
    tie_weights = getattr(head_model, "tie_weights", None)
    if callable(tie_weights):
        tie_weights()
    return head_model


def frozen_copy(model: M) -> M:
    """A deep copy of ``model`` in eval mode with no trainable parameter.

    The "original model" :math:`f^0` of the alignment loss: make it once, before
    fine-tuning starts. It costs as much memory as the model.
    """
    frozen = copy.deepcopy(model)
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode without gradients, then restore every module's mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training

"""What the benchmark measures on: model sizes, BERT-shaped parameters, gradient rows.

Parameters are shaped like BERT-base encoder layers (14 tensors per layer, named as in
``transformers`` so that :class:`~gradsurgery.layers.LayerSets` finds the layers), shrunk
for small sizes and cut to the exact parameter count. Gradients are written straight into
a wrapper's flat buffer, as ``opt.backward(...)`` leaves them, and are built so that the
surgery has work to do: GEM's task gradient violates every constraint, and the objectives'
gradients conflict in alternation (cosine ≈ −0.3 between rows of different parity).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "DTYPES",
    "PRESETS",
    "bert_like_params",
    "conflicting_task",
    "objective_rows",
    "parse_size",
]

PRESETS: dict[str, int] = {
    "bert-base": 109_482_240,
    "mbert": 177_853_440,
    "xlmr-base": 278_043_648,
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

_LAYER: list[tuple[str, tuple[int, ...]]] = [
    ("attention.self.query.weight", (768, 768)),
    ("attention.self.query.bias", (768,)),
    ("attention.self.key.weight", (768, 768)),
    ("attention.self.key.bias", (768,)),
    ("attention.self.value.weight", (768, 768)),
    ("attention.self.value.bias", (768,)),
    ("attention.output.dense.weight", (768, 768)),
    ("attention.output.dense.bias", (768,)),
    ("intermediate.dense.weight", (3072, 768)),
    ("intermediate.dense.bias", (3072,)),
    ("output.dense.weight", (768, 3072)),
    ("output.dense.bias", (768,)),
    ("output.LayerNorm.weight", (768,)),
    ("output.LayerNorm.bias", (768,)),
]
_SHARED = 0.65  # weight of the shared part: cosines ±SHARED²/(1 + SHARED²) ≈ ±0.3


def parse_size(text: str) -> tuple[str, int]:
    """``(label, p)`` for a preset name (``"bert-base"``, ``"mbert"``, ``"xlmr-base"``) or a number.

    Raises:
        ValueError: neither a preset nor a positive number.
    """
    if text in PRESETS:
        return text, PRESETS[text]
    try:
        p = int(float(text))
    except ValueError:
        p = 0
    if p < 1:
        raise ValueError(f"a size is one of {sorted(PRESETS)} or a positive number, got {text!r}")
    return f"{p:.0e}".replace("e+0", "e"), p


def bert_like_params(
    p: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[str, nn.Parameter]]:
    """Named parameters shaped like BERT layers, ``p`` values in all.

    Layers repeat as ``encoder.layer.{i}.…``; what does not fill a whole layer is one
    ``pooler.dense.weight`` vector (outside every layer).
    """
    layer_size = sum(math.prod(shape) for _, shape in _LAYER)
    scale = math.sqrt(min(1.0, p / layer_size))
    while True:  # shrink until one layer fits (rounding up small dimensions may overshoot)
        shapes = [(name, tuple(max(1, int(d * scale)) for d in shape)) for name, shape in _LAYER]
        per_layer = sum(math.prod(shape) for _, shape in shapes)
        if per_layer <= p or scale < 1e-3:
            break
        scale *= 0.9
    layers = p // per_layer
    named: list[tuple[str, nn.Parameter]] = []
    for i in range(layers):
        for name, shape in shapes:
            tensor = torch.zeros(shape, device=device, dtype=dtype)
            named.append((f"encoder.layer.{i}.{name}", nn.Parameter(tensor)))
    rest = p - layers * per_layer
    if rest:
        tensor = torch.zeros(rest, device=device, dtype=dtype)
        named.append(("pooler.dense.weight", nn.Parameter(tensor)))
    return named


def conflicting_task(rows: Tensor, seed: int = 0) -> None:
    """Fill ``[g; g_1; …; g_t]`` with random rows and ``g`` pointing against the ``g_k``."""
    generator = torch.Generator(device=rows.device).manual_seed(seed)
    rows.normal_(generator=generator)
    if rows.shape[0] > 1:
        rows[0].sub_(rows[1:].sum(dim=0), alpha=2.0 / (rows.shape[0] - 1))


def objective_rows(rows: Tensor, seed: int = 0) -> None:
    """Fill ``(T, p)`` rows with conflicting gradients of norms spread over 0.5…2.

    Row ``i`` is an independent part plus ``±SHARED`` times a shared part (sign
    alternating with ``i``), scaled to norm ≈ ``2^{(i mod 3) − 1}``.
    """
    generator = torch.Generator(device=rows.device).manual_seed(seed)
    p = rows.shape[1]
    shared = torch.empty(p, device=rows.device, dtype=rows.dtype).normal_(generator=generator)
    for i in range(rows.shape[0]):
        rows[i].normal_(generator=generator)
        rows[i].add_(shared, alpha=_SHARED * (-1) ** i)
        rows[i].mul_(2.0 ** ((i % 3) - 1) / math.sqrt((1 + _SHARED**2) * p))

r"""The layer sets that fine-tuning slow and fast slows down or speeds up (Guo et al., 2023).

Guo et al. (ACL 2023) sort the weights of a 12-layer multilingual encoder (XLM-R) into:

* :math:`S_I`: all weights of layers 0–9 (re-initialising any of them hurts transfer);
* :math:`S_{II} \subset S_I`: the feed-forward weights of layers 0–3 (freezing them helps);
* :math:`V_I`: all weights of layers 10–11 (they hold pre-training-task knowledge);
* :math:`V_{II} \subset V_I`: the attention weights of layers 10–11;
* everything else (embeddings, heads) is in none of them.

For :math:`L` layers the fractions scale with depth: :math:`V_I` is the last
:math:`\lceil 2L/12 \rceil` layers, :math:`S_I` the first :math:`\lceil 10L/12 \rceil`, and
:math:`S_{II}` the first :math:`\lceil 4L/12 \rceil`. Rounding both up can give the layer on
the boundary to :math:`S_I` and :math:`V_I` at once (whenever 6 does not divide :math:`L`,
e.g. :math:`L = 8`: 7 + 2 layers); it then goes to :math:`V_I`, so :math:`S_I` is every
layer below :math:`V_I` (the first :math:`L - \lceil L/6 \rceil = \lfloor 10L/12 \rfloor`)
and :math:`S_{II}` is capped at :math:`S_I`. This keeps all four sets non-empty from
:math:`L = 2` on; a one-layer encoder is all :math:`V_I`.

"Weights" are all parameters of a sub-layer, as in the paper's update rule: the attention
sub-layer is the self-attention projections, its output projection and its LayerNorm; the
feed-forward sub-layer is the two dense layers and their LayerNorm; biases included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "SET_NAMES",
    "EncoderLayout",
    "LayerSets",
    "LayerSplit",
    "SetName",
    "split_layers",
]

SetName = Literal["S_I", "S_II", "V_I", "V_II", "other"]
SET_NAMES: tuple[SetName, ...] = ("S_I", "S_II", "V_I", "V_II", "other")
SubLayer = Literal["attention", "feed-forward"]


@dataclass(frozen=True)
class LayerSplit:
    """The layers of each set for an encoder of ``num_layers`` layers.

    Attributes:
        slow: the layers of :math:`S_I` (all their weights).
        slow_key: the layers of :math:`S_{II}` (their feed-forward weights).
        fast: the layers of :math:`V_I`; :math:`V_{II}` is their attention weights.
    """

    num_layers: int
    slow: range
    slow_key: range
    fast: range


def _ceil_twelfths(twelfths: int, num_layers: int) -> int:
    return -(-twelfths * num_layers // 12)


def split_layers(num_layers: int) -> LayerSplit:
    r"""The paper's 10 / 4 / 2 layers of 12, scaled to ``num_layers`` (see the module doc)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    fast = _ceil_twelfths(2, num_layers)
    slow = num_layers - fast
    slow_key = min(_ceil_twelfths(4, num_layers), slow)
    return LayerSplit(num_layers, range(slow), range(slow_key), range(slow, num_layers))


@dataclass(frozen=True)
class EncoderLayout:
    """Where an encoder's layers are, and which modules of a layer are which sub-layer.

    .. code-block:: python

        EncoderLayout("encoder.layer.{i}", attention=("attention",),
                      feed_forward=("intermediate", "output"), name="bert")

    A parameter belongs to layer ``i`` if its name contains ``layer`` with ``{i}`` replaced
    by ``i``, starting at a module boundary (any prefix such as ``bert.`` may come before);
    it belongs to a sub-layer if the rest of its name starts with one of that sub-layer's
    module paths. Every layer must have parameters of both sub-layers.

    Args:
        layer: the layers' module path, with ``{i}`` where the layer index is.
        attention: module paths, relative to a layer, of the attention sub-layer.
        feed_forward: module paths, relative to a layer, of the feed-forward sub-layer.
        name: a name for summaries and error messages.

    Raises:
        ValueError: ``layer`` without exactly one ``{i}``, or empty or shared module paths.
    """

    layer: str
    attention: tuple[str, ...]
    feed_forward: tuple[str, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if (
            not isinstance(self.layer, str)
            or self.layer.count("{i}") != 1
            or any(brace in self.layer.replace("{i}", "") for brace in "{}")
            or "" in self.layer.split(".")
        ):
            raise ValueError(
                "layer must be a dotted module path with one '{i}' for the layer index, "
                f"e.g. 'encoder.layer.{{i}}', got {self.layer!r}"
            )
        for field in ("attention", "feed_forward"):
            paths = getattr(self, field)
            if isinstance(paths, str) or not all(
                isinstance(path, str) and path and "" not in path.split(".") for path in paths
            ):
                raise ValueError(f"{field} must be dotted module paths, got {paths!r}")
            if not paths:
                raise ValueError(f"{field} must name at least one module path")
            object.__setattr__(self, field, tuple(paths))
        shared = set(self.attention) & set(self.feed_forward)
        if shared:
            raise ValueError(
                f"module paths {sorted(shared)} are in both attention and feed_forward"
            )

    def locate(self, name: str) -> tuple[str, int, str] | None:
        """``(prefix, index, rest)`` for a parameter name inside a layer, else ``None``."""
        layer = re.escape(self.layer).replace(re.escape("{i}"), r"(?P<index>\d+)")
        match = re.match(rf"(?P<prefix>(?:.*?\.)??){layer}\.(?P<rest>.+)$", name)
        if match is None:
            return None
        return match["prefix"], int(match["index"]), match["rest"]

    def sub_layer(self, rest: str) -> SubLayer | None:
        """Which sub-layer a name relative to its layer is in (``None``: neither)."""

        def under(paths: Sequence[str]) -> bool:
            return any(rest == path or rest.startswith(f"{path}.") for path in paths)

        in_attention, in_feed_forward = under(self.attention), under(self.feed_forward)
        if in_attention and in_feed_forward:
            raise ValueError(
                f"{rest!r} is under both an attention path {list(self.attention)} and a "
                f"feed-forward path {list(self.feed_forward)} of the {self.name} layout"
            )
        if in_attention:
            return "attention"
        return "feed-forward" if in_feed_forward else None


_BERT = EncoderLayout("encoder.layer.{i}", ("attention",), ("intermediate", "output"), "bert")
_DISTILBERT = EncoderLayout(
    "transformer.layer.{i}",
    ("attention", "sa_layer_norm"),
    ("ffn", "output_layer_norm"),
    "distilbert",
)

PRESETS: dict[str, EncoderLayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": _DISTILBERT,
}
"""Layouts by name. ``"bert"`` (the same as ``"roberta"`` and ``"xlm-roberta"``) fits every
model with BERT's module names: BERT, mBERT, RoBERTa, XLM-R, ELECTRA, CamemBERT."""


def _resolve_layout(layout: EncoderLayout | str | None, names: Sequence[str]) -> EncoderLayout:
    if isinstance(layout, EncoderLayout):
        return layout
    if isinstance(layout, str):
        if layout not in PRESETS:
            raise ValueError(
                f"unknown layout preset {layout!r}; the presets are {sorted(PRESETS)}, or pass "
                "an EncoderLayout"
            )
        return PRESETS[layout]
    if layout is not None:
        raise TypeError(
            f"layout must be a preset name, an EncoderLayout or None, got {type(layout).__name__}"
        )
    layouts = dict.fromkeys(PRESETS.values())
    found = [candidate for candidate in layouts if any(map(candidate.locate, names))]
    if len(found) == 1:
        return found[0]
    expected = " or ".join(f"'{c.layer}.…' ({c.name})" for c in layouts)
    if not found:
        raise ValueError(
            f"no encoder layout detected: no parameter is named like {expected} "
            f"(the first ones are {list(names[:3])}); pass layout=EncoderLayout(...)"
        )
    raise ValueError(
        f"the parameters match several layouts ({', '.join(c.name for c in found)}); pass "
        "layout= to choose one"
    )


def _range_text(layers: range) -> str:
    if not layers:
        return "none"
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}–{layers[-1]}"


class LayerSets:
    r"""The parameters of :math:`S_I \supset S_{II}`, :math:`V_I \supset V_{II}` and the rest.

    .. code-block:: python

        sets = LayerSets.from_model(model)           # layout detected from the names
        print(sets)                                  # which parameters went where
        sets.names("S_II")                           # the names in a set

    Each parameter has one *role*, the innermost set it is in: ``"S_II"`` (also in
    :math:`S_I`), ``"S_I"`` (in :math:`S_I` only), ``"V_II"``, ``"V_I"`` or ``"other"``.

    Args:
        named_parameters: ``(name, parameter)`` pairs, as ``model.named_parameters()`` gives.
        layout: a preset name (see :data:`PRESETS`), an :class:`EncoderLayout`, or ``None``
            to detect the preset from the names.
        num_layers: the encoder's depth, if you want it checked against the names.

    Attributes:
        layout: the :class:`EncoderLayout` used.
        location: where the layers are, e.g. ``"bert.encoder.layer.{i}"``.
        num_layers: the encoder's depth :math:`L`.
        split: the layers of each set (:class:`LayerSplit`).
        roles: the role of every parameter, by name, in the order given.

    Raises:
        ValueError: the layout matches no parameter, matches several encoders, finds layer
            indices with gaps or another depth than ``num_layers``, or a layer without
            attention or feed-forward parameters; the message says what was expected.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, Tensor]],
        layout: EncoderLayout | str | None = None,
        *,
        num_layers: int | None = None,
    ) -> None:
        named = list(named_parameters)
        names = [name for name, _ in named]
        self.layout = _resolve_layout(layout, names)
        located = {name: self.layout.locate(name) for name in names}
        inside = {name: where for name, where in located.items() if where is not None}
        if not inside:
            raise ValueError(
                f"the {self.layout.name} layout expects parameters named like "
                f"'{self.layout.layer}.…'; none of the {len(names)} parameters is (the first "
                f"ones are {names[:3]})"
            )
        prefixes = sorted({prefix for prefix, _, _ in inside.values()})
        if len(prefixes) > 1:
            raise ValueError(
                f"the {self.layout.name} layout finds several encoders "
                f"({', '.join(repr(p + self.layout.layer) for p in prefixes)}); build the sets "
                "from one of them"
            )
        self.location = prefixes[0] + self.layout.layer
        self.num_layers = self._depth({index for _, index, _ in inside.values()}, num_layers)
        self.split = split_layers(self.num_layers)
        sub_layers = {name: self.layout.sub_layer(rest) for name, (_, _, rest) in inside.items()}
        self._check_sub_layers(inside, sub_layers)

        self.roles: dict[str, SetName] = {}
        for name in names:
            where = inside.get(name)
            self.roles[name] = "other" if where is None else self._role(where[1], sub_layers[name])
        self._by_id = {id(param): (param, self.roles[name]) for name, param in named}
        self._numel = {name: param.numel() for name, param in named}

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        layout: EncoderLayout | str | None = None,
        *,
        num_layers: int | None = None,
    ) -> LayerSets:
        """The sets of ``model.named_parameters()`` (see the class)."""
        return cls(model.named_parameters(), layout, num_layers=num_layers)

    def _depth(self, indices: set[int], num_layers: int | None) -> int:
        depth = max(indices) + 1
        if len(indices) != depth:
            raise ValueError(
                f"the layers found at '{self.location}' are {sorted(indices)}; expected "
                f"0 … {depth - 1} without gaps"
            )
        if num_layers is not None and num_layers != depth:
            raise ValueError(f"num_layers is {num_layers} but '{self.location}' has {depth} layers")
        return depth

    def _check_sub_layers(
        self, inside: dict[str, tuple[str, int, str]], sub_layers: dict[str, SubLayer | None]
    ) -> None:
        expected: dict[SubLayer, tuple[str, ...]] = {
            "attention": self.layout.attention,
            "feed-forward": self.layout.feed_forward,
        }
        for index in range(self.num_layers):
            members = [name for name, (_, i, _) in inside.items() if i == index]
            for sub_layer, paths in expected.items():
                if not any(sub_layers[name] == sub_layer for name in members):
                    rests = sorted({inside[name][2].split(".")[0] for name in members})
                    raise ValueError(
                        f"the {self.layout.name} layout expects {sub_layer} parameters under "
                        f"{[f'{self.location}.{path}' for path in paths]} (i = {index}), but "
                        f"layer {index} has only modules {rests}; pass a layout that fits "
                        "this model"
                    )

    def _role(self, index: int, sub_layer: SubLayer | None) -> SetName:
        if index in self.split.fast:
            return "V_II" if sub_layer == "attention" else "V_I"
        if sub_layer == "feed-forward" and index in self.split.slow_key:
            return "S_II"
        return "S_I"

    def role(self, param: Tensor) -> SetName:
        """The innermost set ``param`` is in (``"other"`` for a parameter not named here)."""
        entry = self._by_id.get(id(param))
        return entry[1] if entry is not None and entry[0] is param else "other"

    def names(self, set_name: SetName) -> tuple[str, ...]:
        """The names in a set, as the paper defines it (``"S_I"`` includes :math:`S_{II}`)."""
        if set_name not in SET_NAMES:
            raise ValueError(f"unknown set {set_name!r}; the sets are {list(SET_NAMES)}")
        roles = {"S_I": ("S_I", "S_II"), "V_I": ("V_I", "V_II")}.get(set_name, (set_name,))
        return tuple(name for name, role in self.roles.items() if role in roles)

    def summary(self, verbose: bool = False) -> str:
        """A table of the sets (layers, sub-layers, tensors, elements); ``verbose`` lists names."""
        layout, split = self.layout, self.split
        rows: list[tuple[SetName, str, str]] = [
            ("S_I", _range_text(split.slow), "all"),
            (
                "S_II",
                _range_text(split.slow_key),
                f"feed-forward ({', '.join(layout.feed_forward)})",
            ),
            ("V_I", _range_text(split.fast), "all"),
            ("V_II", _range_text(split.fast), f"attention ({', '.join(layout.attention)})"),
            ("other", "-", "outside the layers"),
        ]
        width = max(len(what) for _, _, what in rows)
        lines = [
            f"LayerSets: {layout.name} layout, {self.num_layers} layers at '{self.location}'",
            f"{'set':7s}{'layers':8s}{'parameters':{width}s}  {'tensors':>7s}  {'elements':>11s}",
        ]
        for set_name, layers, what in rows:
            members = self.names(set_name)
            elements = sum(self._numel[name] for name in members)
            label = f"  {set_name}" if set_name in ("S_II", "V_II") else set_name
            lines.append(
                f"{label:7s}{layers:8s}{what:{width}s}  {len(members):7d}  {elements:11,d}"
            )
        if verbose:
            lines += [f"  {role:6s}{name}" for name, role in self.roles.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layout={self.layout.name!r}, num_layers={self.num_layers}, "
            f"location={self.location!r})"
        )

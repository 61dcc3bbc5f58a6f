"""How a parameter's ``.grad`` is tied to the flat buffer, and how to tell that the tie broke.

A :class:`~gradsurgery.flat.GradientBank` gives every parameter a tensor that aliases its
segment of a row (the same memory, with the parameter's own strides, but not an autograd
view, so ``p.grad.detach_()`` works). Training code can break the tie in ways that cost
nothing to detect by looking at the parameter list only, never at the values:

* a new ``.grad`` object (``model.zero_grad()`` then a backward pass, user code assigning
  ``p.grad``): the identity check;
* new memory behind the same ``.grad`` object (``Module._apply`` sets ``p.grad.data`` when
  converting a model, e.g. ``model.to(memory_format=torch.channels_last)``): the pointer;
* the parameter itself changed (``model.half()``, ``p.data = ...`` with a new shape,
  ``requires_grad_(False)``): its :func:`signature` or its trainability.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = [
    "BankChanges",
    "Signature",
    "alias",
    "as_grad",
    "check_supported",
    "copy_into",
    "local",
    "refuse_unsafe",
    "signature",
    "track",
]

Signature = tuple[torch.dtype, torch.device, torch.Size, tuple[int, ...]]


def _dtensor() -> Any:
    """The ``DTensor`` class if it was imported (a DTensor can exist only then), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: the local shard of a ``DTensor``, or itself."""
    dtensor = _dtensor()
    if dtensor is not None and isinstance(tensor, dtensor):
        shard: Tensor = tensor.to_local()
        return shard
    return tensor


def as_grad(param: Tensor, view: Tensor) -> Tensor:
    """What ``param.grad`` is set to for the row ``view``: the view, or a DTensor around it."""
    dtensor = _dtensor()
    if dtensor is not None and isinstance(param, dtensor):
        sharded: Any = param
        grad: Tensor = dtensor.from_local(
            view,
            sharded.device_mesh,
            sharded.placements,
            run_check=False,
            shape=sharded.shape,
            stride=sharded.stride(),
        )
        return grad
    return view


def copy_into(view: Tensor, grad: Tensor) -> None:
    """``view ← grad``; a sparse gradient (``Embedding(sparse=True)``) is written densely."""
    value = local(grad)
    if value.layout == torch.strided:
        view.copy_(value)
    else:
        view.zero_().add_(value)


def signature(param: Tensor) -> Signature:
    """What a parameter's segment depends on: dtype, device, shape and strides."""
    return param.dtype, param.device, param.shape, param.stride()


def check_supported(param: Tensor) -> None:
    """Raise ``ValueError`` unless ``param`` is a dense real floating-point tensor with data."""
    if param.layout != torch.strided:
        raise ValueError(f"parameter of layout {param.layout} is not supported; only dense")
    if param.is_complex():
        raise ValueError(
            f"complex parameters are not supported (got {param.dtype}); gradient surgery "
            "needs real parameters (float16, bfloat16, float32 or float64): store a complex "
            "parameter as its real and imaginary parts (torch.view_as_real)"
        )
    if param.device.type == "meta":
        raise ValueError(
            "a parameter is on the meta device and holds no values; materialise the model "
            "first (e.g. model.to_empty(device=...) and initialise it), then build the optimizer"
        )


def alias(row: Tensor, offset: int, local_param: Tensor) -> Tensor:
    """A tensor on ``row``'s memory from ``offset``, shaped and strided like ``local_param``.

    It shares memory with ``row`` without being an autograd view of it. A dense layout
    (contiguous, channels-last, any permutation) keeps the parameter's strides, so that
    gradients follow torch's layout contract; any other layout gets contiguous strides.
    """
    stride = local_param.stride()
    if not _dense(local_param.shape, stride):
        stride = torch.empty(local_param.shape, device="meta").stride()
    out = torch.empty(0, dtype=row.dtype, device=row.device)
    with torch.no_grad():
        out.set_(row.untyped_storage(), row.storage_offset() + offset, local_param.shape, stride)
    return out


def _dense(shape: torch.Size, stride: tuple[int, ...]) -> bool:
    """Whether the strides lay ``shape`` out without gaps or overlaps (in some dim order)."""
    expected = 1
    for step, size in sorted(zip(stride, shape, strict=True)):
        if size == 1:
            continue
        if step != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class BankChanges:
    """How the trainable parameters differ from those a bank was built for.

    Attributes:
        joined: trainable parameters the bank does not hold (unfrozen, added).
        left: parameters the bank holds that are frozen or no longer given.
        recast: held parameters whose dtype, device or memory layout changed.
        reshaped: held parameters whose shape changed.
    """

    joined: tuple[Tensor, ...] = ()
    left: tuple[Tensor, ...] = ()
    recast: tuple[Tensor, ...] = ()
    reshaped: tuple[Tensor, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joined or self.left or self.recast or self.reshaped)

    @staticmethod
    def between(
        params: Iterable[Tensor], held: tuple[Tensor, ...], signatures: dict[int, Signature]
    ) -> BankChanges:
        """Compare ``params`` with the ``held`` parameters and their recorded signatures."""
        joined: list[Tensor] = []
        left: list[Tensor] = []
        recast: list[Tensor] = []
        reshaped: list[Tensor] = []
        seen: set[int] = set()
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            recorded = signatures.get(id(p))
            if recorded is None:
                if p.requires_grad:
                    joined.append(p)
            elif not p.requires_grad:
                left.append(p)
            elif (p.dtype, p.device, p.shape, p.stride()) != recorded:  # signature(p)
                (reshaped if p.shape != recorded[2] else recast).append(p)
        left.extend(p for p in held if id(p) not in seen)
        if not (joined or left or recast or reshaped):
            return _NO_CHANGE
        return BankChanges(tuple(joined), tuple(left), tuple(recast), tuple(reshaped))


_NO_CHANGE = BankChanges()


class _Mark:
    """Post-accumulate-grad hook: tell the bank (if it is still alive) who got a gradient.

    It holds the bank weakly, so a parameter never keeps an old bank or its optimizer alive.
    """

    def __init__(self, mark: Callable[[Tensor], None]) -> None:
        self._mark = weakref.WeakMethod(mark)

    def __call__(self, param: Tensor) -> None:
        mark = self._mark()
        if mark is not None:
            mark(param)


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def track(
    owner: Any, params: Iterable[Tensor], mark: Callable[[Tensor], None]
) -> Callable[[], Any]:
    """Call ``mark(p)`` each time a backward pass accumulates into ``p.grad``.

    The hooks are removed when ``owner`` is garbage-collected or when the returned function
    is called, whichever comes first.
    """
    hook = _Mark(mark)
    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]  # type: ignore[no-untyped-call]
    return weakref.finalize(owner, _remove, handles)


def refuse_unsafe(
    changes: BankChanges,
    *,
    started: bool,
    pending: bool,
    holds_gradient: Callable[[Tensor], bool],
    per_parameter_state: str | None,
    optimizer_state: Mapping[Tensor, Mapping[str, Any]],
) -> None:
    """Raise ``RuntimeError`` if the bank cannot follow ``changes`` without a wrong step.

    A new dtype, device or memory layout is followed (the rows are converted, as
    ``Module._apply`` converts ``.grad``), unless the inner optimizer keeps state on the
    old device (its step would fail); state of the old dtype is left as torch leaves it.
    A frozen parameter leaves the bank (keeping its ``.grad``, as in torch), unless the
    step's surgery already ran (``pending``: the rewritten gradient of the remaining ones
    is no longer guaranteed to satisfy the constraints), or it holds a gradient once extra
    rows hold this step's (``started``: it would be stepped unprojected). A parameter that becomes
    trainable once extra rows hold gradients (``started``) would miss its part of them. A
    new shape is refused while its old gradient is still to be used, when the wrapper keeps
    state of the old shape across steps (``per_parameter_state`` names it), or when the
    inner optimizer does.
    """
    redo = "call zero_grad() and compute the step's gradients again"
    for p in changes.recast:
        for key, value in optimizer_state.get(p, {}).items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.device != p.device:
                raise RuntimeError(
                    f"a parameter was moved to {p.device}, but the inner optimizer's state "
                    f"{key!r} for it is on {value.device}; move it too with "
                    "opt.load_state_dict(opt.state_dict()), or move the model before "
                    "building the optimizer"
                )
    if changes.joined and (started or pending):
        raise RuntimeError(
            "a parameter became trainable after this step's gradients were computed; its "
            f"gradients are missing from them: {redo}"
        )
    if changes.left and pending:
        raise RuntimeError(
            "a parameter was frozen (or removed) after apply_surgery() rewrote the step's "
            f"gradient, which is then no longer guaranteed: {redo}"
        )
    if started and any(holds_gradient(p) for p in changes.left):
        raise RuntimeError(
            "a parameter was frozen (or removed) holding a gradient after this step's "
            "constraint or objective rows were computed: torch would step its gradient, "
            f"which the surgery can no longer take into account: {redo}"
        )
    for p in changes.reshaped:
        if started or pending or holds_gradient(p):
            raise RuntimeError(
                f"a parameter changed shape (now {tuple(p.shape)}) after its gradient was "
                f"computed, which no longer fits it: {redo}, or change shapes before the "
                "backward passes"
            )
        if per_parameter_state is not None:
            raise RuntimeError(
                f"a parameter changed shape (now {tuple(p.shape)}), but {per_parameter_state} "
                "is kept per parameter across steps and cannot follow a new shape; build a "
                "new optimizer after changing a parameter's shape"
            )
        for key, value in optimizer_state.get(p, {}).items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise RuntimeError(
                    f"a parameter changed shape (now {tuple(p.shape)}), but the inner "
                    f"optimizer's state {key!r} for it has shape {tuple(value.shape)}; reset "
                    "it (del optimizer.state[param]) or build a new optimizer"
                )

"""Intermediate features by module name or generalised-layer index, read with forward hooks so models
keep a plain forward().

A method asks for taps such as ``"layer2"`` or ``"pool"``; any architecture whose submodules carry
those names works unchanged. It may also ask for an int ``i``: the output of the model's generalised
layer ``i`` (``generalised_layers``), so a sweep can name cut points by position across depths.
The captured tensors are the modules' own outputs, graph included, so a student's feature loss
trains the layers below the tap.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Tap = str | int
"""A module name (``"layer1.0"``) or the index of a generalised layer."""

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Sigmoid, nn.Tanh,
)


def generalised_layers(model: nn.Module) -> tuple[str, ...]:
    """The module names at whose outputs ``model`` can be cut, in forward order.

    The module tree is read the way it runs: the root's children in order, and inside them every
    ``nn.Sequential`` child by child (its forward is exactly that). A module with children of its own
    that is not a Sequential has its own forward() (a residual block) and is one layer, never split.
    A cut follows each activation module, each such block, and each child of the root (so a pooling
    head or the classifier, which hold no non-linearity, are layers too). A cut is named by the
    outermost module that ends there: a Sequential whose last child ends at the cut gives its own
    name, so the CIFAR ResNets read stem, layer1.0, ..., layer1, ..., layer3, pool, fc and every
    top-level tap is one of them. The root's children must run in the order they were registered,
    as the ResNets' forward() does.
    """
    layers: list[str] = []
    for name, child in model.named_children():
        layers += _cuts(child, name)
        if not layers or layers[-1] != name:
            layers.append(name)
    return tuple(layers)


def _cuts(module: nn.Module, name: str) -> list[str]:
    if isinstance(module, _ACTIVATIONS):
        return [name]
    if not isinstance(module, nn.Sequential):
        return [name] if next(module.children(), None) is not None else []
    children = list(module.named_children())
    cuts = [cut for child_name, child in children for cut in _cuts(child, f"{name}.{child_name}")]
    if cuts and cuts[-1] == f"{name}.{children[-1][0]}":
        cuts[-1] = name
    return cuts


def tap_module_name(model: nn.Module, tap: Tap, layers: tuple[str, ...] | None = None) -> str:
    """The name of the module of ``model`` whose output ``tap`` reads; ValueError naming what exists.

    ``layers`` is ``generalised_layers(model)`` when the caller already has it.
    """
    if isinstance(tap, int) and not isinstance(tap, bool):
        layers = generalised_layers(model) if layers is None else layers
        if not 0 <= tap < len(layers):
            raise ValueError(
                f"tap {tap} is out of range for {type(model).__name__}'s {len(layers)} generalised layers; "
                f"allowed: 0..{len(layers) - 1} or a module name"
            )
        return layers[tap]
    modules = dict(model.named_modules())
    if not isinstance(tap, str) or not tap or tap not in modules:
        top_level = ", ".join(child for child, _ in model.named_children())
        raise ValueError(
            f"unknown tap {tap!r} for {type(model).__name__}; available: {top_level} "
            "(or a dotted path to a module inside one, e.g. 'layer1.0', or a generalised layer index)"
        )
    return tap


class FeatureTaps:
    """Hooks on the tapped submodules of ``model``; calling it runs the model and returns the features.

    ``taps(images)`` gives ``(logits, {tap: tensor})``, keyed by each tap as it was asked for (a name,
    or an int for a generalised layer), so ``features[params["student_tap"]]`` works for both. Two
    taps on one module (``"layer3"`` and its index) each get the same tensor. The dict is built fresh
    for each call and this object keeps no reference to it afterwards, so no step holds on to an
    earlier step's graph. A module that runs twice in one forward pass reports its last output.
    Use as a context manager, or call ``remove()``, to leave the model with no hooks.
    A model with a ``tap_view(module_name, output)`` method sees every captured output through it
    (a ViT turns its (N, 1 + h*w, D) tokens into (N, D, h, w) maps there).
    """

    def __init__(self, model: nn.Module, taps: Iterable[Tap]):
        self.model = model
        self.taps = tuple(taps)
        modules = dict(model.named_modules())
        layers = generalised_layers(model) if any(isinstance(tap, int) for tap in self.taps) else ()
        names = [tap_module_name(model, tap, layers) for tap in self.taps]
        self._captured: dict[Tap, Tensor] | None = None
        self._view: Callable[[str, Tensor], Tensor] | None = getattr(model, "tap_view", None)
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_hook(self._hook_for(tap, name)) for tap, name in zip(self.taps, names)
        ]

    def _hook_for(self, tap: Tap, name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            # Only a forward started by __call__ is recorded; a plain model(x) passes through untouched.
            if self._captured is not None:
                self._captured[tap] = output if self._view is None else self._view(name, output)

        return hook

    def __call__(self, images: Tensor) -> tuple[Tensor, dict[Tap, Tensor]]:
        if not self._handles and self.taps:
            raise RuntimeError("these feature taps were removed; create new FeatureTaps for the model")
        captured: dict[Tap, Tensor] = {}
        self._captured = captured
        try:
            logits = self.model(images)
        finally:
            self._captured = None
        missing = [tap for tap in self.taps if tap not in captured]
        if missing:
            raise RuntimeError(f"taps {missing} did not run in {type(self.model).__name__}.forward()")
        return logits, captured

    def remove(self) -> None:
        """Take every hook off the model; calling it again does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

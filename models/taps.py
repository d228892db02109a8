"""Intermediate features by module name, read with forward hooks so models keep a plain forward().

A method asks for taps such as ``"layer2"`` or ``"pool"``; any architecture whose submodules carry
those names works unchanged. The captured tensors are the modules' own outputs, graph included, so a
student's feature loss trains the layers below the tap.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class FeatureTaps:
    """Hooks on the named submodules of ``model``; calling it runs the model and returns the features.

    ``taps(images)`` gives ``(logits, {tap_name: tensor})``. The dict is built fresh for each call and
    this object keeps no reference to it afterwards, so no step holds on to an earlier step's graph.
    A module that runs twice in one forward pass reports its last output.
    Use as a context manager, or call ``remove()``, to leave the model with no hooks.
    """

    def __init__(self, model: nn.Module, tap_names: Iterable[str]):
        self.model = model
        self.tap_names = tuple(tap_names)
        modules = dict(model.named_modules())
        for name in self.tap_names:
            if not name or name not in modules:
                top_level = ", ".join(child for child, _ in model.named_children())
                raise ValueError(
                    f"unknown tap {name!r} for {type(model).__name__}; available: {top_level} "
                    "(or a dotted path to a module inside one, e.g. 'layer1.0')"
                )
        self._captured: dict[str, Tensor] | None = None
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_hook(self._hook_for(name)) for name in self.tap_names
        ]

    def _hook_for(self, name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            # Only a forward started by __call__ is recorded; a plain model(x) passes through untouched.
            if self._captured is not None:
                self._captured[name] = output

        return hook

    def __call__(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self._handles and self.tap_names:
            raise RuntimeError("these feature taps were removed; create new FeatureTaps for the model")
        captured: dict[str, Tensor] = {}
        self._captured = captured
        try:
            logits = self.model(images)
        finally:
            self._captured = None
        missing = [name for name in self.tap_names if name not in captured]
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

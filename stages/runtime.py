"""A stage's runtime switches (``amp``, ``channels_last``, ``compile``, ``cudnn_benchmark``) as they take effect.

The switches change how fast a stage runs, never what it computes, so none is in a stage hash
(``pipeline/sweep_schema.py``'s ``RUNTIME``). ``amp``, ``channels_last`` and ``cudnn_benchmark``
pay only on a GPU and stay off on any other device: a CPU stage computes exactly what it did
before they existed, whatever the sweep says. ``compile`` works on a CPU too (torch's inductor
writes C++ there, built with the machine's C compiler), so it is taken as asked; where it fails,
the call it replaced runs eager instead (``compile_call``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class RuntimeSwitches:
    """The switches of one stage run on its device; all off is plain eager float32 in torch's default layout."""

    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def on_device(cls, runtime: Mapping[str, Any], device: torch.device) -> RuntimeSwitches:
        """The switches of a stage spec's ``runtime`` on ``device``. A switch missing from ``runtime``
        is off: a config.json written before the switch existed runs as it did then."""
        cuda = device.type == "cuda"
        return cls(
            amp=cuda and bool(runtime.get("amp", False)),
            channels_last=cuda and bool(runtime.get("channels_last", False)),
            compile=bool(runtime.get("compile", False)),
            cudnn_benchmark=cuda and bool(runtime.get("cudnn_benchmark", False)),
        )

    def autocast(self, device: torch.device) -> torch.autocast:
        """bfloat16 autocast where ``amp`` is on; bfloat16 needs no loss scaler, so the optimiser
        step and the checkpoint stay as they are without it."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp)

    def inputs(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of images on ``device``, in the models' memory layout."""
        if self.channels_last:
            return images.to(device, memory_format=torch.channels_last)
        return images.to(device)

    def record(self) -> dict[str, bool]:
        """The switches for log.pkl's environment: what took effect, not what the sweep asked."""
        return {
            "amp": self.amp, "channels_last": self.channels_last, "compile": self.compile,
            "cudnn_benchmark": self.cudnn_benchmark,
        }


def compile_call(module: nn.Module, name: str, on_fallback: Callable[[str], None]) -> None:
    """Replace ``module.<name>`` (``forward``, or a method's ``loss``) by its ``torch.compile``d self.

    The module object itself is kept, not wrapped in the ``OptimizedModule`` that
    ``torch.compile(module)`` returns, whose state dict prefixes every key with ``_orig_mod.``: the
    optimiser, the checkpoint and final.pt see the same module, parameters and keys as an eager
    run, and feature-tap hooks on its submodules run inside the compiled call. Compiling can fail
    when ``torch.compile`` is called or at any call that (re)compiles (no C compiler, an operation
    the compiler cannot trace); then ``on_fallback`` gets the reason in one line, ``module.<name>``
    is its eager self again for the rest of the run, and the failed call is repeated eager, so an
    error eager code raises as well still stops the stage.
    """
    eager = getattr(module, name)
    try:
        compiled = torch.compile(eager)
    except Exception as error:  # whatever stops compiling, eager still runs
        on_fallback(_one_line(error))
        return

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as error:  # as above; eager repeats the call and raises its own errors
            delattr(module, name)
            on_fallback(_one_line(error))
            return eager(*args, **kwargs)

    setattr(module, name, call)


def _one_line(error: Exception) -> str:
    """``Type: first line of the message``, at most 300 characters: compiler errors run to pages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]

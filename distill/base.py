"""The contract every distillation method meets, and the registry that finds them.

A method is one file ``distill/<name>.py`` holding two things:

* ``METHOD``: a plain dict literal that declares the method's name, its config keys (with defaults
  and limits), the feature taps it reads and any pre-stage it needs. It is a literal, not code, so
  that the planner (``pipeline/catalogue.py``) can read and validate a sweep without importing
  torch; this file's ``Method`` reads the same dict at run time, so there is one source of truth.
* a ``Method`` subclass decorated with ``@register_method``: an ``nn.Module`` whose own parameters
  (translators, projections) are trained with the student and saved with it, and whose
  ``loss()`` returns named loss terms that the training loop sums and logs one by one.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelOutput:
    """What one forward pass of a tapped model gives a method: logits and named feature maps."""

    logits: torch.Tensor
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """One training batch as the loop feeds it: images (N, C, H, W), integer class labels (N,), the
    0-based epoch it belongs to (for methods whose weights follow a schedule, such as a warm-up) and
    each sample's index (N,) into the training set (for methods that keep per-sample state, such as
    CRD's memory bank; None where no training set stands behind the batch)."""

    images: torch.Tensor
    labels: torch.Tensor
    epoch: int = 0
    indices: torch.Tensor | None = None
    generator: torch.Generator | None = None
    """A CPU generator seeded by (seed, epoch, step) for a method's own random draws (mixup's weights),
    so a resumed epoch draws the same numbers; None outside the training loop."""


@dataclass(frozen=True)
class MethodContext:
    """Facts a method needs to build its extra modules, known only once models exist.

    ``teacher_tap_shapes`` / ``student_tap_shapes`` map tap name -> per-sample shape (C, H, W) or (D,).
    ``pre_stage_dir`` is the weights folder of the method's pre-stage (FT's paraphraser), if any.
    ``train_size`` is the number of training samples (the range of ``Batch.indices``); 0 where it is
    not known yet, as in the planner's preflight, which loads no data.
    ``teacher`` is the trained teacher, for a method that reuses its modules (simkd's classifier);
    None in the preflight and when a saved student is rebuilt, whose saved state restores them.
    ``train_labels`` (train_size,) are the training split's labels, indexed like ``Batch.indices``,
    for a method that draws samples by class (CRD's negatives); None where no data is loaded.
    """

    num_classes: int
    teacher_tap_shapes: Mapping[str, tuple[int, ...]]
    student_tap_shapes: Mapping[str, tuple[int, ...]]
    pre_stage_dir: str | None = None
    train_size: int = 0
    teacher: nn.Module | None = None
    train_labels: torch.Tensor | None = None


class MethodConfigError(ValueError):
    """A method setting that cannot work with these models; ``key`` names the offending setting."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Method(nn.Module):
    """Base of all methods. Subclasses set ``METHOD`` (the module's declaration) and ``loss``."""

    METHOD: ClassVar[dict[str, Any]]

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        """Keeps the settings and refuses, with ``check``, any that cannot fit these models' taps."""
        super().__init__()
        self.params = dict(params)
        self.context = context
        self.check(self.params, context)

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Raise MethodConfigError for settings that cannot work with these models' taps."""

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        """Teacher feature taps this method reads (names of modules in the teacher)."""
        return ()

    @property
    def student_taps(self) -> tuple[str, ...]:
        """Student feature taps this method reads; their graphs stay attached so the loss trains them."""
        return ()

    def prepare_batch(self, batch: Batch) -> Batch:
        """The batch both networks see. Most methods show the loader's batch as it is; a sample-mixing
        method (mixup) returns mixed images, and what its loss needs to weigh their labels."""
        return batch

    @property
    def detached_student_tap(self) -> str | None:
        """A student tap whose layers only this method's feature terms train: the rest of the student
        sees that tap's output detached, so no label or logit gradient reaches below it (feature-only
        distillation). None: the whole student trains on every term."""
        return None

    def student_logits(self, student: ModelOutput) -> torch.Tensor:
        """The logits the student predicts with during training (its train accuracy); a method whose
        student predicts through the method's own head (simkd) computes them from the features."""
        return student.logits

    def deployed(self, student: nn.Module) -> nn.Module:
        """The network that validation, evaluation and the parameter count see: the student itself, or
        the student with this method's modules on top (simkd's projector and reused teacher head)."""
        return student

    def cross_entropy(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        """The labelled term every method beside its own adds: ``ce_weight`` x cross-entropy."""
        return self.params["ce_weight"] * F.cross_entropy(student.logits, batch.labels)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Named scalar loss terms, each already multiplied by its weight: the training loop sums them
        as they are and logs each one, so a logged term is exactly what it added to the loss.
        ``teacher`` is None for methods whose METHOD says ``uses_teacher: False``; otherwise it was
        computed under no_grad."""
        raise NotImplementedError


class TapPairMethod(Method):
    """A method that reads one teacher tap and one student tap, named by its ``teacher_tap`` and
    ``student_tap`` params (FT, Tucker, FitNet, SP, PKT, RKD, CC, CRD, SimKD)."""

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return (self.params["teacher_tap"],)

    @property
    def student_taps(self) -> tuple[str, ...]:
        return (self.params["student_tap"],)


class TapListPairMethod(Method):
    """A method that reads lists of teacher and student taps paired in order, named by its
    ``teacher_taps`` and ``student_taps`` params (AT, VID, feature_only); a tap listed twice is hooked once."""

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.params["teacher_taps"]))

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.params["student_taps"]))


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: registers ``cls`` under its ``METHOD['name']``, which must match its file."""
    name = cls.METHOD["name"]
    module_name = cls.__module__.rsplit(".", 1)[-1]
    if name != module_name:
        raise ValueError(f"distill/{module_name}.py declares method {name!r}; a method's name must equal its file name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered class for ``name``, importing ``distill/<name>.py`` on first use."""
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"distill.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"distill.{name}":
                raise KeyError(f"unknown method {name!r}") from None
            raise
    return _REGISTRY[name]

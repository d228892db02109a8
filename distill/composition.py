"""Building a stage's method from its settings, one method or a composition such as ``crd+kd``.

A sweep's ``method`` value names one method or joins several with ``+``, as the CRD paper's "X+KD"
rows and ConKD's ``kd+supcon`` combine them. Each part is the registered method with its own
params (``defaults.methods.<part>``), so it brings its own terms and weights; the labelled
cross-entropy appears once, weighted by the first part's ``ce_weight`` (the planner leaves the
other parts' ``ce_weight`` out of the settings and the hash, since it weighs nothing). Terms keep
their names; a name two parts share is logged as ``<part>.<term>``.

The settings are what the plan hashed: ``{"name", "params"}`` for one method, ``{"name", "parts":
[{"name", "params"}, ...]}`` for a composition.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distill.base import (
    Batch,
    Method,
    MethodConfigError,
    MethodContext,
    ModelOutput,
    method_class,
)

_HOOKS = ("prepare_batch", "detached_student_tap", "student_logits", "deployed")
"""Method hooks that change what the networks see or predict; at most one part may override each."""


def method_parts(settings: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The ``{"name", "params"}`` of each part, in order; one method is a composition of one."""
    return list(settings["parts"]) if "parts" in settings else [settings]


def _part_params(index: int, part: Mapping[str, Any]) -> dict[str, Any]:
    """A part's params; parts after the first get ``ce_weight`` 0, as their cross-entropy is dropped."""
    params = dict(part["params"])
    if index > 0 and "ce_weight" in method_class(part["name"]).METHOD["params"]:
        params["ce_weight"] = 0.0
    return params


def check_method(settings: Mapping[str, Any], context: MethodContext) -> None:
    """Raise MethodConfigError, with ``key`` the dotted ``<part>.<param>`` (or the part's name for a
    clash between parts), for settings that cannot work with these models."""
    overridden: dict[str, str] = {}
    for index, part in enumerate(method_parts(settings)):
        method_type = method_class(part["name"])
        try:
            method_type.check(_part_params(index, part), context)
        except MethodConfigError as error:
            raise MethodConfigError(f"{part['name']}.{error.key}", str(error)) from None
        for hook in _HOOKS:
            if getattr(method_type, hook) is not getattr(Method, hook):
                if hook in overridden:
                    raise MethodConfigError(
                        part["name"],
                        f"{overridden[hook]} and {part['name']} both change the training step ({hook}); "
                        "combine at most one of them",
                    )
                overridden[hook] = part["name"]


def changes_deployment(settings: Mapping[str, Any]) -> bool:
    """Whether the evaluated network is more than the student: some part overrides ``deployed``."""
    return any(method_class(part["name"]).deployed is not Method.deployed for part in method_parts(settings))


def build_method(settings: Mapping[str, Any], context: MethodContext) -> Method:
    """The method module of a stage's settings; check_method's errors are raised the same way."""
    check_method(settings, context)
    parts = [method_class(part["name"])(_part_params(index, part), context) for index, part in enumerate(method_parts(settings))]
    return parts[0] if len(parts) == 1 else Composition(parts)


def _overriding(parts: Sequence[Method], hook: str) -> Method | None:
    return next((part for part in parts if getattr(type(part), hook) is not getattr(Method, hook)), None)


class Composition(Method):
    """Several methods trained as one: the union of their taps, the sum of their terms."""

    def __init__(self, parts: Sequence[Method]):
        nn.Module.__init__(self)
        self.parts = nn.ModuleDict({part.METHOD["name"]: part for part in parts})
        self.params = {}
        self.context = parts[0].context

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(tap for part in self.parts.values() for tap in part.teacher_taps))

    @property
    def student_taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(tap for part in self.parts.values() for tap in part.student_taps))

    def prepare_batch(self, batch: Batch) -> Batch:
        part = _overriding(list(self.parts.values()), "prepare_batch")
        return batch if part is None else part.prepare_batch(batch)

    @property
    def detached_student_tap(self) -> str | None:
        part = _overriding(list(self.parts.values()), "detached_student_tap")
        return None if part is None else part.detached_student_tap

    def student_logits(self, student: ModelOutput) -> torch.Tensor:
        part = _overriding(list(self.parts.values()), "student_logits")
        return student.logits if part is None else part.student_logits(student)

    def deployed(self, student: nn.Module) -> nn.Module:
        part = _overriding(list(self.parts.values()), "deployed")
        return student if part is None else part.deployed(student)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        terms_of = {}
        for index, (name, part) in enumerate(self.parts.items()):
            terms = part.loss(student, teacher if part.METHOD["uses_teacher"] else None, batch)
            terms_of[name] = {term: value for term, value in terms.items() if index == 0 or term != "ce"}
        counts: dict[str, int] = {}
        for terms in terms_of.values():
            for term in terms:
                counts[term] = counts.get(term, 0) + 1
        return {
            term if counts[term] == 1 else f"{name}.{term}": value
            for name, terms in terms_of.items()
            for term, value in terms.items()
        }

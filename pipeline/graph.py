"""The stage graph a plan produces: stage specs, the experiments that read them, and the plan itself.

Everything here is plain data that survives JSON (``to_dict``/``from_dict``) and pickling, because
backends pickle a ``StageSpec`` into each job and the manifest stores the plan as JSON.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class StageSpec:
    """One stage job.

    ``hash`` is the sha256 of the settings it depends on plus its upstream stages' hashes; ``name``
    (``<kind>-<readable>-<hash8>``) is its folder under logs/ and weights/. ``settings`` is what the
    stage function computes from; ``runtime`` (data_root, device, amp) says only where it runs and
    is not hashed. ``upstream`` maps a role (teacher, paraphraser, model) to a stage name.
    """

    kind: str
    name: str
    hash: str
    settings: dict[str, Any]
    upstream: dict[str, str]
    runtime: dict[str, Any]
    resources: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSpec:
        return cls(**_fields_of(cls, data))


@dataclass(frozen=True)
class Experiment:
    """One combination of axis values, with the names of the stages that make its report rows.

    ``teacher`` and ``student`` are architecture names; ``*_stage`` fields are stage names. Every
    experiment has a teacher stage (vanilla ones too, so the report can show the pair's teacher),
    but only methods that use the teacher read it. The analyze stages are None when the sweep asks
    for no analysis (and in manifests written before they existed).
    """

    dataset: str
    teacher: str
    student: str
    method: str
    seed: int
    axis_values: dict[str, Any]
    teacher_stage: str
    teacher_evaluate_stage: str
    paraphraser_stage: str | None
    student_stage: str
    evaluate_stage: str
    teacher_analyze_stage: str | None = None
    student_analyze_stage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        return cls(**_fields_of(cls, data))


@dataclass(frozen=True)
class Plan:
    """A sweep as a stage graph; ``stages`` is in topological order.

    The order is data preparations, teachers, teacher evaluations, paraphrasers, teacher caches,
    students, student evaluations, analyses, each group in the order the sweep's combinations first need them.
    """

    sweep_name: str
    sweep_path: str
    stages: dict[str, StageSpec]
    experiments: tuple[Experiment, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep_name": self.sweep_name,
            "sweep_path": self.sweep_path,
            "stages": [stage.to_dict() for stage in self.stages.values()],
            "experiments": [experiment.to_dict() for experiment in self.experiments],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        stages = [StageSpec.from_dict(stage) for stage in data["stages"]]
        return cls(
            sweep_name=data["sweep_name"],
            sweep_path=data["sweep_path"],
            stages={stage.name: stage for stage in stages},
            experiments=tuple(Experiment.from_dict(experiment) for experiment in data["experiments"]),
        )

    def format(self) -> str:
        """A header line, then one line per stage: name, kind and ``<- upstream names``."""
        width = max((len(name) for name in self.stages), default=0)
        lines = [f"sweep {self.sweep_name} ({self.sweep_path}): {len(self.experiments)} experiments, {len(self.stages)} stages"]
        for stage in self.stages.values():
            line = f"{stage.name:<{width}}  {stage.kind}"
            if stage.upstream:
                line += "  <- " + ", ".join(stage.upstream.values())
            lines.append(line)
        return "\n".join(lines)


def _fields_of(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of dataclass ``cls`` from ``data``; extra keys, or missing ones
    without a default, are errors."""
    names = [field.name for field in fields(cls)]
    required = {field.name for field in fields(cls) if field.default is MISSING and field.default_factory is MISSING}
    if not required <= set(data) or not set(data) <= set(names):
        raise ValueError(f"{cls.__name__}: keys {sorted(data)} do not match; expected: {', '.join(names)}")
    return {name: data[name] for name in names if name in data}

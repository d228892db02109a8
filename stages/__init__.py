"""Stage jobs: one module per stage kind, each with ``run(spec, root)``.

``StageJob`` is what backends submit. It imports the stage module only when the job runs, so
submitting (and pickling it) never imports torch. It is submitit-``Checkpointable``: on a time
limit or preemption signal submitit requeues the same call, and the stage resumes from its last
epoch checkpoint, so a requeued job repeats no finished epoch.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

from submitit.helpers import Checkpointable

from pipeline.plan import StageSpec
from pipeline.store import StageFolders
from pipeline.sweep_schema import STAGE_KINDS


def run_stage(spec: StageSpec | Mapping[str, Any], root: str | os.PathLike) -> str:
    """Runs one stage to completion (resuming from its checkpoint) unless it is already DONE."""
    if not isinstance(spec, StageSpec):
        spec = StageSpec.from_dict(spec)
    root = Path(root)
    if StageFolders(root, spec.name).is_done():
        return spec.name
    if spec.kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {spec.kind!r}; allowed: {', '.join(STAGE_KINDS)}")
    importlib.import_module(f"stages.{spec.kind}").run(spec, root)
    return spec.name


class StageJob(Checkpointable):
    """``run_stage`` as a requeue-able submitit callable (the checkpoint is the stage's own file)."""

    def __call__(self, spec: Mapping[str, Any], root: str) -> str:
        return run_stage(spec, root)

"""Stage jobs: one module per stage kind, each with ``run(stage: StageRun)``.

``StageJob`` is what backends submit. It imports the stage machinery only when the job runs, so
submitting (and pickling it) never imports torch. It is submitit-``Checkpointable``: on a time
limit or preemption signal submitit requeues the same call, and the stage resumes from its last
epoch checkpoint, so a requeued job repeats no finished epoch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from submitit.helpers import Checkpointable

from pipeline.plan import StageSpec


def run_stage(spec: StageSpec | Mapping[str, Any], root: str | os.PathLike, force: bool = False) -> str:
    """Runs one stage unless it is verified DONE; see ``stages.context.run_stage`` for the steps.

    Returns ``"skipped"``, ``"done"`` or ``"elsewhere"`` (another live runner holds the stage).
    """
    from stages.context import run_stage as run

    if not isinstance(spec, StageSpec):
        spec = StageSpec.from_dict(spec)
    return run(spec, Path(root), force=force)


class StageJob(Checkpointable):
    """``run_stage`` as a requeue-able submitit callable (the checkpoint is the stage's own file)."""

    def __call__(self, spec: Mapping[str, Any], root: str) -> str:
        return run_stage(spec, root)

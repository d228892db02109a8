"""Which stages of a plan must run, and why: what every backend and ``status`` decide from the files.

A stage is left alone only when its DONE is verified (files and upstream digests match, see
``pipeline.store``) and none of its upstream stages is going to run again; a damaged teacher is
therefore rebuilt together with every student of the plan built from it. Torch-free and quick (no
file is re-hashed unless its mtime moved), so a fully DONE sweep is recognised in well under a second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pipeline.plan import Plan, StageSpec
from pipeline.store import CorruptFileError, StageFolders, read_json, write_json


def stages_to_run(plan: Plan, root: Path) -> dict[str, str]:
    """Stage name -> why it must run (``not built``, ``damaged: ...``, ``upstream ... runs again``), in plan order."""
    to_run: dict[str, str] = {}
    for name, spec in plan.stages.items():  # plan order: upstream stages come first
        folders = StageFolders(root, name)
        rerun_upstream = next((up for up in spec.upstream.values() if up in to_run), None)
        if not folders.done_marker.is_file():
            to_run[name] = "not built"
        elif (problem := folders.done_problem()) is not None:
            to_run[name] = f"damaged: {problem}"
        elif rerun_upstream is not None:
            to_run[name] = f"upstream {rerun_upstream} runs again"
    return to_run


class PreflightVerdicts:
    """Stages whose settings ``stages/preflight.py`` already accepted, kept in ``jobs/preflight.json``.

    A verdict depends only on what the stage hash covers, plus the data root it was checked with,
    so it is keyed by both and shared by every sweep under the root: a re-submit imports no torch
    for stages it has checked before.
    """

    def __init__(self, root: Path):
        self.path = root / "jobs" / "preflight.json"

    @staticmethod
    def key(spec: StageSpec) -> str:
        return f"{spec.hash}:{spec.runtime.get('data_root')}"

    def unchecked(self, plan: Plan, names: Iterable[str]) -> list[str]:
        accepted = self._load()
        return [name for name in names if self.key(plan.stages[name]) not in accepted]

    def accept(self, plan: Plan, names: Iterable[str]) -> None:
        accepted = self._load()
        accepted.update(dict.fromkeys((self.key(plan.stages[name]) for name in names), True))
        write_json(self.path, accepted)

    def _load(self) -> dict[str, bool]:
        try:
            return dict(read_json(self.path))
        except (FileNotFoundError, CorruptFileError, TypeError, ValueError):
            return {}

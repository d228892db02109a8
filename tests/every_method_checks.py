"""What a finished every-method sweep must show, whichever backend ran it."""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.logfiles import read_log
from pipeline.plan import Plan
from pipeline.store import StageFolders


def check_every_method_trained(plan: Plan, root: Path) -> dict[str, dict]:
    """Every stage is DONE; each student logged finite terms for its epoch; each evaluation scored it.
    Returns each method's result.json."""
    undone = [name for name in plan.stages if not StageFolders(root, name).is_done()]
    assert not undone, f"not DONE: {undone}"
    results = {}
    for experiment in plan.experiments:
        log = read_log(StageFolders(root, experiment.student_stage).logs)
        (entry,) = log["epochs"]
        assert entry["terms"] and all(math.isfinite(value) for value in entry["terms"].values()), experiment.method
        assert entry["val_acc"] is not None, experiment.method
        result = json.loads(StageFolders(root, experiment.evaluate_stage).result.read_text())
        assert 0 <= result["top1_last"] <= 100 and result["parameters"] > 0, experiment.method
        results[experiment.method] = result
    # simkd predicts through its projector and the teacher's head: it is evaluated, and counted, with them.
    if "simkd" in results:
        assert results["simkd"]["parameters"] > results["vanilla"]["parameters"]
    return results

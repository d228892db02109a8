"""A real sweep through ``--backend pbs``: our PBS executor's ``#PBS`` scripts, sent with ``qsub``.

The ``qsub``/``qstat``/``qdel`` here are Debian's Torque wrappers on the local Slurm cluster, so this
proves the scripts, arrays, dependencies and job environment against a real queue; what the
wrappers cannot show of real PBS Pro and Torque is covered by the exact-script tests in
tests/test_pbs.py.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.logfiles import read_log
from pipeline.manifest import Manifest
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from tests.slurm.test_backend import runner, write_sweep


def test_a_sweep_runs_through_qsub_arrays_with_dependencies(slurm_cluster, tmp_path: Path) -> None:
    sweep = write_sweep(
        tmp_path, "pbs-tiny",
        {"pair": ["resnet20:resnet8x0.25"], "method": ["vanilla", "kd"], "seed": [0, 1]},
        {"teacher": {"epochs": 1}, "student": {"epochs": 1}},
        {"default": {"cpus": 1, "mem_gb": 1, "time_min": 10, "pbs_dialect": "torque"}},
    )
    root = tmp_path / "out"
    result = runner("submit", str(sweep), "--backend", "pbs", "--wait", "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    # PBS dependencies name whole arrays, so a kind splits by the upstream arrays it waits on: the
    # teacher (a single job); vanilla students (none) and kd students (the teacher); the teacher's
    # evaluate (the teacher), the vanilla and the kd evaluates (their student array and the teacher).
    assert "submitted 10 stage(s) in 6 array(s)" in result.stdout

    plan = build_plan(sweep)
    assert all(StageFolders(root, name).is_done() for name in plan.stages)
    manifest = Manifest.load(root / "jobs" / "pbs-tiny").stages
    assert {entry["backend"] for entry in manifest.values()} == {"pbs"}
    teacher_job = manifest[plan.experiments[0].teacher_stage]["job_id"]
    students = [name for name, spec in plan.stages.items() if spec.kind == "train_student"]
    for method, after in (("vanilla", []), ("kd", [teacher_job])):
        chosen = [name for name in students if f"-{method}-" in name]
        assert len({manifest[name]["job_id"].split("_")[0] for name in chosen}) == 1  # one qsub array each
        assert all(manifest[name]["after"] == after for name in chosen)
    kd_student = next(name for name in students if "-kd-" in name)
    environment = read_log(StageFolders(root, kd_student).logs)["environment"]
    assert environment["pbs_job_id"]  # the job saw PBS_JOBID (spank_pbs)

"""Submits a 200-experiment sweep (4 teachers, vanilla and kd students) to Slurm with fake stage jobs,
once per way of making each stage wait only on its own upstream jobs, and prints what each costs.

Each stage job trains nothing (tests/slurm/jobs.py ``fake_stage``: it checks its upstream DONE, writes
DONE and records when it ran); one teacher sleeps ``SLOW_TEACHER_S``. The designs:

* ``union``: one array per stage kind waiting on all its tasks' upstream jobs (kdbench before issue 6);
* ``split``: one array per distinct set of upstream jobs (200 evaluates: 200 arrays);
* ``held``: one array per kind, submitted held, each task's own dependency set with ``scontrol
  update``, then ``scontrol release``;
* ``narrowed``: one array per kind waiting on the union, then each task whose own set is narrower
  updated with ``scontrol update`` (no hold); what ``ClusterBackend`` does.

Printed per design: scheduler commands, arrays, task updates, submit time, time until all stages are
DONE, and how long after the submit began the vanilla students started (they need no teacher, so
they could have started at once; the two-CPU test cluster runs two jobs at a time, so some wait
for a CPU in any design). Uses the cluster in SLURM_CONF, or starts the tests' local cluster.

Run: .venv/bin/python bench/submit.py [design ...]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import submitit  # noqa: E402
import yaml  # noqa: E402

from pipeline.backends.cluster import ClusterBackend  # noqa: E402
from pipeline.backends.slurm import SlurmScheduler  # noqa: E402
from pipeline.manifest import submit_lock  # noqa: E402
from pipeline.plan import Plan, build_plan  # noqa: E402
from pipeline.store import StageFolders  # noqa: E402

SLOW_TEACHER_S = 30
SWEEP = {
    "name": "bench-submit",
    "axes": {
        "dataset": ["digits"],
        "pair": ["resnet20:resnet8x0.25", "resnet56:resnet8x0.25", "resnet110:resnet8x0.25", "resnet32x4:resnet8x0.25"],
        "method": ["vanilla", "kd"],
        "seed": list(range(25)),
    },
    "resources": {"default": {"cpus": 1, "mem_gb": 0.5, "time_min": 5}},
}


class Narrowed(SlurmScheduler):
    """What ClusterBackend does on Slurm, counting the task updates it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    def set_task_dependencies(self, waits: dict[str, list[str]]) -> list[str]:
        self.updates += len(waits)
        return super().set_task_dependencies(waits)


class UnionWaits(Narrowed):
    """Tasks keep their array's union of waits: kdbench before issue 6."""

    def set_task_dependencies(self, waits: dict[str, list[str]]) -> list[str]:
        return []


class SplitArrays(Narrowed):
    """No per-task updates: the backend splits each kind into one array per distinct set of waits."""

    task_dependencies = False


class HeldArrays(Narrowed):
    """Arrays go out held; ``release`` lets them go once every task has its own dependencies."""

    def executor(self, folder: Path, resources: dict[str, Any], after: list[str], job_name: str) -> submitit.Executor:
        executor = super().executor(folder, resources, after, job_name)
        executor.parameters["additional_parameters"]["hold"] = True
        return executor

    def release(self, job_ids: list[str]) -> None:
        self._run(["scontrol", "release", ",".join(sorted({job_id.split("_")[0] for job_id in job_ids}))])


DESIGNS = {"union": UnionWaits, "split": SplitArrays, "held": HeldArrays, "narrowed": Narrowed}


def run_design(name: str, plan_file: Path, work: Path) -> dict[str, Any]:
    from tests.slurm.jobs import fake_stage, stage_times  # by module name, so the jobs can unpickle it

    plan = build_plan(plan_file)
    root = work / name
    jobs_dir = root / "jobs" / plan.sweep_name
    slow_teacher = next(experiment.teacher_stage for experiment in plan.experiments if experiment.teacher == "resnet110")
    (root / "sleep").mkdir(parents=True)
    (root / "sleep" / slow_teacher).write_text(str(SLOW_TEACHER_S))
    scheduler = DESIGNS[name]()
    started = time.time()
    with submit_lock(jobs_dir):
        summary = ClusterBackend(scheduler, root, jobs_dir, fake_stage, report=print).submit(plan)
        if isinstance(scheduler, HeldArrays):
            scheduler.release(list(summary.submitted.values()))
    submit_seconds = time.time() - started
    wait_all_done(plan, root)
    all_done_seconds = time.time() - started
    vanilla = sorted({e.student_stage for e in plan.experiments if e.method == "vanilla"})
    vanilla_lags = [stage_times(root, stage)[0] - started for stage in vanilla]
    return {
        "calls": scheduler.calls, "arrays": summary.arrays, "updates": scheduler.updates, "submit_s": submit_seconds,
        "all_done_s": all_done_seconds, "vanilla_median_s": statistics.median(vanilla_lags),
        "vanilla_max_s": max(vanilla_lags), "stages": len(plan.stages),
    }


def wait_all_done(plan: Plan, root: Path, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(StageFolders(root, name).is_done() for name in plan.stages):
        if time.monotonic() > deadline:
            raise SystemExit(f"not all {len(plan.stages)} stages DONE after {timeout_s:.0f} s")
        time.sleep(0.5)


def main(designs: list[str]) -> None:
    unknown = sorted(set(designs) - set(DESIGNS))
    if unknown:
        raise SystemExit(f"unknown design(s) {', '.join(unknown)}; allowed: {', '.join(DESIGNS)}")
    with ExitStack() as stack:
        if not os.environ.get("SLURM_CONF"):
            from tests.slurm.cluster import LocalSlurmCluster

            cluster = stack.enter_context(LocalSlurmCluster())
            os.environ.update(cluster.env)
            print(f"started the local test cluster ({cluster.state_dir})")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdbench-bench-")))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        plan_file = work / "sweep.yaml"
        plan_file.write_text(yaml.safe_dump(SWEEP))
        started = time.perf_counter()
        plan = build_plan(plan_file)
        print(f"plan time {time.perf_counter() - started:.3f} s: {len(plan.experiments)} experiments, {len(plan.stages)} stages; "
              f"one teacher sleeps {SLOW_TEACHER_S} s")
        results = {}
        for name in designs:
            results[name] = run_design(name, plan_file, work)
            print(f"{name}: {results[name]}", flush=True)

    print(f"\n{'design':10} {'commands':>8} {'arrays':>6} {'updates':>7} {'submit s':>8} {'all DONE s':>10} "
          f"{'vanilla start s (median / max)':>31}")
    for name, result in results.items():
        print(f"{name:10} {result['calls']:8d} {result['arrays']:6d} {result['updates']:7d} {result['submit_s']:8.2f} "
              f"{result['all_done_s']:10.1f} {result['vanilla_median_s']:15.1f} / {result['vanilla_max_s']:5.1f}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(DESIGNS))

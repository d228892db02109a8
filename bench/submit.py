"""Plans and submits a 200-experiment sweep (4 teachers) to Slurm with stages that exit at once.

What it shows: the cost of our own submission path, not of training. Each stage job only writes
its DONE marker, so the numbers are plan time, how many scheduler commands the submit sent (the
target is one per stage kind and resource shape: 3 here, plus none for the queue when nothing was
recorded before), how long the submit took (target: under 5 s), and how long the cluster took to
run all 408 stage jobs. Uses the cluster in SLURM_CONF, or starts the tests' local cluster.

Run: .venv/bin/python bench/submit.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from pipeline.backends.cluster import ClusterBackend  # noqa: E402
from pipeline.backends.slurm import SlurmScheduler  # noqa: E402
from pipeline.manifest import submit_lock  # noqa: E402
from pipeline.plan import StageSpec, build_plan  # noqa: E402
from pipeline.store import StageFolders  # noqa: E402

SWEEP = {
    "name": "bench-submit",
    "axes": {
        "dataset": ["digits"],
        "pair": ["resnet20:resnet8x0.25", "resnet56:resnet8x0.25", "resnet110:resnet8x0.25", "resnet32x4:resnet8x0.25"],
        "method": ["kd", "tucker"],
        "seed": list(range(25)),
    },
    "resources": {"default": {"cpus": 1, "mem_gb": 0.5, "time_min": 5}},
}


def mark_done(spec: dict, root: str) -> str:
    """The stage job of this benchmark: no training, just the completion marker."""
    StageFolders(Path(root), StageSpec.from_dict(spec).name).mark_done()
    return spec["name"]


def main() -> None:
    from bench.submit import mark_done as job  # by module name, so the jobs can unpickle it

    with ExitStack() as stack:
        if not os.environ.get("SLURM_CONF"):
            from tests.slurm.cluster import LocalSlurmCluster

            cluster = stack.enter_context(LocalSlurmCluster())
            os.environ.update(cluster.env)
            print(f"started the local test cluster ({cluster.state_dir})")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdbench-bench-")))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        sweep = work / "sweep.yaml"
        sweep.write_text(yaml.safe_dump(SWEEP))

        started = time.perf_counter()
        plan = build_plan(sweep)
        plan_seconds = time.perf_counter() - started

        scheduler = SlurmScheduler()
        root, jobs_dir = work / "out", work / "out" / "jobs" / plan.sweep_name
        started = time.perf_counter()
        with submit_lock(jobs_dir):
            summary = ClusterBackend(scheduler, root, jobs_dir, job, report=lambda _: None).submit(plan)
        submit_seconds = time.perf_counter() - started

        kinds = {(spec.kind, str(spec.resources)) for spec in plan.stages.values()}
        while not all(StageFolders(root, name).is_done() for name in plan.stages):
            time.sleep(0.5)
        all_done_seconds = time.perf_counter() - started

    print(f"experiments {len(plan.experiments)}, stages {len(plan.stages)}, stage kinds x resource shapes {len(kinds)}")
    print(f"plan time               {plan_seconds:8.3f} s")
    print(f"scheduler calls         {scheduler.calls:8d}    (target <= {len(kinds)}: {'met' if scheduler.calls <= len(kinds) else 'NOT met'})")
    print(f"arrays submitted        {summary.arrays:8d}")
    print(f"submit time             {submit_seconds:8.3f} s  (target < 5 s: {'met' if submit_seconds < 5 else 'NOT met'})")
    print(f"time until all DONE     {all_done_seconds:8.1f} s  ({len(plan.stages) / all_done_seconds:.1f} stage jobs/s)")


if __name__ == "__main__":
    main()

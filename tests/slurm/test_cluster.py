"""The local Slurm cluster itself: scheduling, arrays, dependencies, accounting, requeue, Torque wrappers.

These pin the behaviour the pipeline relies on, so a wrong ``slurm.conf`` fails here first and not as
a hung pipeline test.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurmCluster
from tests.slurm.config import local_node
from tests.slurm.jobs import submit, wait_file_text, wait_finished, wait_state

pytestmark = pytest.mark.slurm

PBS_SCRIPT = """#!/bin/bash
#PBS -N kdpbs
#PBS -l walltime=00:05:00
echo "$PBS_JOBID|${PBS_ARRAY_INDEX:-}|${PBS_ARRAY_ID:-}|$PBS_O_WORKDIR" > "pbs-${PBS_ARRAY_INDEX:-single}.txt"
sleep "${SLEEP:-0}"
"""


def write_script(folder: Path, name: str, text: str) -> Path:
    script = folder / name
    script.write_text(text)
    script.chmod(0o755)
    return script


def test_node_is_idle_with_the_machines_cpus(slurm_cluster: LocalSlurmCluster) -> None:
    slurm_cluster.wait_idle(30)
    listed = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N|%t|%c|%P").stdout.split()
    assert listed == [f"localhost|idle|{local_node().cpus}|debug*"]


def test_clients_find_the_cluster_through_the_environment(slurm_cluster: LocalSlurmCluster) -> None:
    assert os.environ["SLURM_CONF"] == slurm_cluster.env["SLURM_CONF"]
    assert "is UP" in slurm_cluster.run("scontrol", "ping").stdout


def test_wrapped_command_writes_its_output_file(slurm_cluster: LocalSlurmCluster, slurm_folder: Path) -> None:
    job = submit(slurm_cluster, "-D", str(slurm_folder), "-o", "out-%j.txt", "--wrap", "echo hi")
    assert wait_finished(slurm_cluster, job) == {job: "COMPLETED"}
    assert (slurm_folder / f"out-{job}.txt").read_text() == "hi\n"


def test_array_tasks_run_side_by_side(slurm_cluster: LocalSlurmCluster, slurm_folder: Path) -> None:
    body = "date +%s.%N > start-$SLURM_ARRAY_TASK_ID; sleep 3; date +%s.%N > end-$SLURM_ARRAY_TASK_ID"
    job = submit(slurm_cluster, "-D", str(slurm_folder), "-o", "/dev/null", "--array=0-3", "--wrap", body)
    states = wait_finished(slurm_cluster, job, timeout=90, tasks=4)
    assert states == {f"{job}_{task}": "COMPLETED" for task in range(4)}
    spans = [
        (float((slurm_folder / f"start-{task}").read_text()), float((slurm_folder / f"end-{task}").read_text()))
        for task in range(4)
    ]
    most_at_once = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert most_at_once >= min(4, local_node().cpus)


def test_sacct_reports_state_and_exit_code(slurm_cluster: LocalSlurmCluster, slurm_folder: Path) -> None:
    passing = submit(slurm_cluster, "-D", str(slurm_folder), "-o", "/dev/null", "--wrap", "true")
    failing = submit(slurm_cluster, "-D", str(slurm_folder), "-o", "/dev/null", "--wrap", "exit 3")
    wait_finished(slurm_cluster, passing)
    wait_finished(slurm_cluster, failing)
    rows = slurm_cluster.run(
        "sacct", "-X", "-n", "-P", "-j", f"{passing},{failing}", "-o", "JobID,State,ExitCode"
    ).stdout.split()
    assert sorted(rows) == sorted([f"{passing}|COMPLETED|0:0", f"{failing}|FAILED|3:0"])


def test_dependant_of_a_failed_job_is_cancelled(slurm_cluster: LocalSlurmCluster, slurm_folder: Path) -> None:
    failing = submit(slurm_cluster, "-D", str(slurm_folder), "-o", "/dev/null", "--wrap", "sleep 1; exit 3")
    dependant = submit(
        slurm_cluster, "-D", str(slurm_folder), "-o", "/dev/null",
        f"--dependency=afterok:{failing}", "--wrap", "touch ran",
    )
    assert wait_finished(slurm_cluster, failing) == {failing: "FAILED"}
    assert wait_finished(slurm_cluster, dependant, timeout=30) == {dependant: "CANCELLED"}
    assert not (slurm_folder / "ran").exists()


def test_requeued_job_runs_again(slurm_cluster: LocalSlurmCluster, slurm_folder: Path) -> None:
    script = write_script(slurm_folder, "count.sh", (
        "#!/bin/bash\n"
        "runs=$(( $(cat runs 2>/dev/null || echo 0) + 1 ))\n"
        "echo $runs > runs\n"
        "if [ $runs -eq 1 ]; then sleep 120; fi\n"
    ))
    job = submit(slurm_cluster, "-D", str(slurm_folder), "-o", "/dev/null", "--requeue", str(script))
    wait_file_text(slurm_folder / "runs", "1")
    slurm_cluster.run("scontrol", "requeue", job)
    wait_file_text(slurm_folder / "runs", "2", timeout=60)
    assert wait_finished(slurm_cluster, job) == {job: "COMPLETED"}
    history = slurm_cluster.run("sacct", "-X", "-n", "-P", "--duplicates", "-j", job, "-o", "State").stdout.split()
    assert history == ["REQUEUED", "COMPLETED"]


@pytest.mark.parametrize("array_flag", ["-J", "-t"])
def test_qsub_array_job_sees_the_pbs_environment(
    slurm_cluster: LocalSlurmCluster, slurm_folder: Path, array_flag: str
) -> None:
    write_script(slurm_folder, "job.pbs", PBS_SCRIPT)
    job = slurm_cluster.run("qsub", array_flag, "0-1", "job.pbs", cwd=slurm_folder).stdout.strip()
    assert wait_finished(slurm_cluster, job, tasks=2) == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}
    names = slurm_cluster.run("sacct", "-X", "-n", "-P", "-j", job, "-o", "JobName").stdout.split()
    assert names == ["kdpbs", "kdpbs"]
    for index in ("0", "1"):
        job_id, array_index, array_id, workdir = (slurm_folder / f"pbs-{index}.txt").read_text().strip().split("|")
        assert (job_id.isdigit(), array_index, array_id, workdir) == (True, index, job, str(slurm_folder))
        assert (slurm_folder / f"job.pbs.o{job}.{index}").is_file()


def test_qstat_shows_a_qsub_job_and_qdel_cancels_it(slurm_cluster: LocalSlurmCluster, slurm_folder: Path) -> None:
    write_script(slurm_folder, "job.pbs", PBS_SCRIPT)
    job = slurm_cluster.run("qsub", "-N", "kdsleep", "-v", "SLEEP=300", "job.pbs", cwd=slurm_folder).stdout.strip()
    wait_state(slurm_cluster, job, "RUNNING")
    wait_file_text(slurm_folder / "pbs-single.txt", f"{job}|||{slurm_folder}")
    row = slurm_cluster.run("qstat", job).stdout.splitlines()[-1].split()
    assert (row[0], row[1], row[-2], row[-1]) == (job, "kdsleep", "R", "debug")
    slurm_cluster.run("qdel", job)
    assert wait_finished(slurm_cluster, job, timeout=30) == {job: "CANCELLED"}


def test_each_start_is_new_and_stop_ends_its_daemons(slurm_machine: None) -> None:
    first = LocalSlurmCluster()
    with first:
        first_job = submit(first, "-o", "/dev/null", "--wrap", "true")
        first_pids = [daemon.pid for daemon in first.daemons]
    second = LocalSlurmCluster()
    with second:
        assert second.state_dir != first.state_dir and second.ports != first.ports
        assert submit(second, "-o", "/dev/null", "--wrap", "true") == first_job == "1"
        assert wait_finished(second, "1") == {"1": "COMPLETED"}
        second_pids = [daemon.pid for daemon in second.daemons]
    for pid in first_pids + second_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not first.state_dir.exists() and not second.state_dir.exists()

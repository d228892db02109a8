"""The PBS backend without a scheduler: exact scripts and argv, the job environment, qstat parsing, errors.

Scheduler commands are intercepted at ``pbs.run_command``; the qstat texts below are written from
the PBS Pro and Torque ``qstat -f`` layouts (attribute lines ``    key = value``, long values
wrapped onto tab-indented lines) and from Slurm's Torque wrapper (tab-indented, C for every end).
One test runs whole jobs through a fake qsub (a shell script that runs the job at once) and needs
the repository installed (``pip install -e . --no-deps``) for submitit to find the job environment.
"""
from __future__ import annotations

import importlib.metadata
import os
import stat
import sys
from pathlib import Path

import pytest
from submitit.core import utils

from pipeline.backends import pbs
from pipeline.backends import pbs_scripts as scripts
from pipeline.backends.pbs_job import PBSJobEnvironment

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/opt/venv/bin/python"
JOB_VARIABLES = (
    "SUBMITIT_EXECUTOR", "PBS_JOBID", "PBS_ARRAY_INDEX", "PBS_ARRAYID", "PBS_ARRAY_ID",
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
)


def installed() -> bool:
    try:
        importlib.metadata.distribution("kdbench")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class Scheduler:
    """Stands in for ``pbs.run_command``: records each argv and answers from a queue of outputs."""

    def __init__(self, *outputs: str):
        self.sent: list[list[str]] = []
        self.outputs = list(outputs)

    def __call__(self, argv: list[str], accept: tuple[int, ...] = (0,)) -> str:
        self.sent.append(list(argv))
        return self.outputs.pop(0) if self.outputs else ""


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Scheduler:
    fake = Scheduler()
    monkeypatch.setattr(pbs, "run_command", fake)
    monkeypatch.setattr(pbs.PBSJob, "watcher", pbs.PBSInfoWatcher("pro"))
    monkeypatch.setattr(pbs.TorqueJob, "watcher", pbs.PBSInfoWatcher("torque"))
    return fake


@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in JOB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "pbs")
    return monkeypatch


def gpu_executor(folder: Path, dialect: str) -> pbs.PBSExecutor:
    executor = pbs.PBSExecutor(folder, dialect=dialect, python=PYTHON)
    executor.update_parameters(cpus_per_task=4, gpus_per_node=1, mem_gb=16, timeout_min=120, queue="gpu", account="proj")
    return executor


def submitted_script(job: pbs.PBSJob) -> str:
    return job.paths.submission_file.read_text()


# --- scripts and argv -------------------------------------------------------------------------

def test_pro_single_job_script(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = ["4321.pbs01\n"]
    job = gpu_executor(tmp_path, "pro").submit(print, "hello")
    assert job.job_id == "4321"
    assert submitted_script(job) == (
        "#!/bin/bash\n"
        "#PBS -N submitit\n"
        "#PBS -l select=1:ncpus=4:ngpus=1:mem=16gb\n"
        "#PBS -l walltime=02:00:00\n"
        "#PBS -q gpu\n"
        "#PBS -A proj\n"
        "\n"
        'cd "${PBS_O_WORKDIR:-.}"\n'
        "unset PBS_ARRAY_INDEX PBS_ARRAYID PBS_ARRAY_ID SLURM_ARRAY_TASK_ID SLURM_ARRAY_JOB_ID\n"
        "export SUBMITIT_EXECUTOR=pbs\n"
        f"{PYTHON} -u -m pipeline.backends.pbs_job {tmp_path}\n"
    )


def test_torque_single_job_script(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = ["5501.torque01.example.org\n"]
    job = gpu_executor(tmp_path, "torque").submit(print, "hello")
    assert isinstance(job, pbs.TorqueJob) and job.job_id == "5501"
    assert submitted_script(job) == (
        "#!/bin/bash\n"
        "#PBS -N submitit\n"
        "#PBS -l nodes=1:ppn=4:gpus=1\n"
        "#PBS -l mem=16gb\n"
        "#PBS -l walltime=02:00:00\n"
        "#PBS -q gpu\n"
        "#PBS -A proj\n"
        "\n"
        'cd "${PBS_O_WORKDIR:-.}"\n'
        "unset PBS_ARRAY_INDEX PBS_ARRAYID PBS_ARRAY_ID SLURM_ARRAY_TASK_ID SLURM_ARRAY_JOB_ID\n"
        "export SUBMITIT_EXECUTOR=pbs\n"
        f"{PYTHON} -u -m pipeline.backends.pbs_job {tmp_path}\n"
    )


# Dependencies name whole jobs and whole arrays, never one subjob (102_3 stands for its array 102):
# * PBS Pro / OpenPBS qsub(1B), "-W depend=dependency_list": the arg_list is PBS job IDs, and an array
#   job's ID is "sequence_number[]" (openpbs/openpbs doc/man1/qsub.1B); the PBS Professional User's
#   Guide, "Job Array Dependencies": dependencies are not supported for subjobs or ranges of subjobs.
# * Torque qsub(1), "-W depend=dependency_list", "Array Dependencies": "afterokarray:arrayid[count]",
#   "afteranyarray:arrayid[count]", example "depend=afterokarray:21.tom.com[]"; no dependency on a single
#   subjob is documented (adaptivecomputing/torque doc/man1/qsub.1.in).
# * Slurm's Torque wrapper hands the list to sbatch --dependency, where a bare array id means the whole
#   array (Slurm's job_array.html, "Other Command Use").


def array_of_three(folder: Path, dialect: str, **options: object) -> list[pbs.PBSJob]:
    executor = pbs.PBSExecutor(folder, dialect=dialect, python=PYTHON, **options)
    executor.update_parameters(job_name="students", dependency=["101.pbs01", "102_3"], dependency_type="afterok")
    with executor.batch():
        jobs = [executor.submit(abs, -value) for value in range(3)]
    return jobs


def test_pro_array_with_dependency_is_one_qsub(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = ["4400[].pbs01\n"]
    jobs = array_of_three(tmp_path / "%j", "pro")
    assert [job.job_id for job in jobs] == ["4400_0", "4400_1", "4400_2"]
    assert len(scheduler.sent) == 1
    assert all(job.paths.submitted_pickle.exists() for job in jobs)
    assert submitted_script(jobs[0]) == (
        "#!/bin/bash\n"
        "#PBS -N students\n"
        "#PBS -l select=1:ncpus=1\n"
        "#PBS -l walltime=00:05:00\n"
        "#PBS -J 0-2\n"
        "#PBS -W depend=afterok:101:102[]\n"
        "\n"
        'cd "${PBS_O_WORKDIR:-.}"\n'
        "export SUBMITIT_EXECUTOR=pbs\n"
        f"{PYTHON} -u -m pipeline.backends.pbs_job {tmp_path / '%j'}\n"
    )


def test_torque_array_with_dependency(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = ["5600[].torque01.example.org\n"]
    jobs = array_of_three(tmp_path, "torque")
    assert [job.job_id for job in jobs] == ["5600_0", "5600_1", "5600_2"]
    assert submitted_script(jobs[0]) == (
        "#!/bin/bash\n"
        "#PBS -N students\n"
        "#PBS -l nodes=1:ppn=1\n"
        "#PBS -l walltime=00:05:00\n"
        "#PBS -t 0-2\n"
        "#PBS -W depend=afterok:101,afterokarray:102[]\n"
        "\n"
        'cd "${PBS_O_WORKDIR:-.}"\n'
        "export SUBMITIT_EXECUTOR=pbs\n"
        f"{PYTHON} -u -m pipeline.backends.pbs_job {tmp_path}\n"
    )


def test_slurm_wrappers_name_whole_arrays_by_their_slurm_id(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = ["57\n"]  # Slurm's qsub prints sbatch's bare id, for arrays too
    jobs = array_of_three(tmp_path, "torque", slurm_wrappers=True)
    assert [job.job_id for job in jobs] == ["57_0", "57_1", "57_2"]
    assert "#PBS -W depend=afterok:101:102\n" in submitted_script(jobs[0])
    assert scheduler.sent[0][5].endswith("_%a.err")


def test_qsub_argv_has_logs_and_exports_environment(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = ["4321.pbs01\n", "4400[].pbs01\n"]
    gpu_executor(tmp_path, "pro").submit(print, "hello")
    array_of_three(tmp_path, "pro")
    for argv, suffix in zip(scheduler.sent, ("", "_^array_index^")):
        script = Path(argv[-1])
        uid = script.name.removeprefix(".submission_file_").removesuffix(".sh")
        assert argv == ["qsub", "-V", "-o", f"{tmp_path}/pbs_{uid}{suffix}.out", "-e", f"{tmp_path}/pbs_{uid}{suffix}.err", str(script)]


def test_a_batch_of_one_is_a_plain_job(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = ["4500.pbs01\n"]
    executor = pbs.PBSExecutor(tmp_path, python=PYTHON)
    with executor.batch():
        job = executor.submit(abs, -1)
    assert job.job_id == "4500"
    assert "-J" not in submitted_script(job)


def test_afterany_and_fractional_memory() -> None:
    request = scripts.make_request({"mem_gb": 0.5, "dependency": ["7_1"], "dependency_type": "afterany"})
    text = scripts.submission_script(request, "pro", "true", array_size=2)
    assert "#PBS -l select=1:ncpus=1:mem=512mb\n" in text
    assert "#PBS -W depend=afterany:7[]\n" in text


@pytest.mark.parametrize("dialect, slurm_wrappers, line", [
    ("pro", False, "#PBS -W depend=afterany:7[]:8:9[]\n"),
    ("torque", False, "#PBS -W depend=afterany:8,afteranyarray:7[],afteranyarray:9[]\n"),
    ("torque", True, "#PBS -W depend=afterany:7:8:9\n"),
])
def test_dependencies_on_subjobs_wait_on_their_whole_arrays(dialect: str, slurm_wrappers: bool, line: str) -> None:
    # Two subjobs of array 7, the single job 8 and the whole array 9 (as PBSScheduler.dependency_id names it).
    request = scripts.make_request({"dependency": ["7_1", "7_2", "8", "9[]"], "dependency_type": "afterany"})
    script = scripts.submission_script(request, dialect, "true", array_size=2, slurm_wrappers=slurm_wrappers)
    assert [text + "\n" for text in script.splitlines() if text.startswith("#PBS -W")] == [line]


@pytest.mark.parametrize("parameters, named", [
    ({"partition": "gpu"}, "partition"),
    ({"dependency_type": "after"}, "dependency_type"),
    ({"dependency": "101"}, "dependency"),
    ({"job_name": "two words"}, "job_name"),
])
def test_bad_parameters_fail_in_one_line(tmp_path: Path, parameters: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named) as error:
        pbs.PBSExecutor(tmp_path).update_parameters(**parameters)
    assert "\n" not in str(error.value)


def test_unknown_dialect_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dialect 'sge' is not one of pro, torque"):
        pbs.PBSExecutor(tmp_path, dialect="sge")


# --- job environment --------------------------------------------------------------------------

@pytest.mark.parametrize("variables, job_id", [
    ({"PBS_JOBID": "4321.pbs01"}, "4321"),
    ({"PBS_JOBID": "4400[2].pbs01", "PBS_ARRAY_INDEX": "2", "PBS_ARRAY_ID": "4400[].pbs01"}, "4400_2"),
    ({"PBS_JOBID": "5600[1].torque01.example.org", "PBS_ARRAYID": "1"}, "5600_1"),
    ({"PBS_JOBID": "60", "PBS_ARRAY_INDEX": "2", "PBS_ARRAY_ID": "57", "SLURM_ARRAY_JOB_ID": "57",
      "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "60"}, "57_2"),  # Slurm's wrappers with spank_pbs
    ({"SLURM_JOB_ID": "61"}, "61"),  # Slurm's wrappers without spank_pbs
])
def test_job_environment_reads_pbs_variables(job_env: pytest.MonkeyPatch, variables: dict, job_id: str) -> None:
    for name, value in variables.items():
        job_env.setenv(name, value)
    environment = PBSJobEnvironment()
    assert environment.activated()
    assert environment.job_id == job_id
    assert (environment.num_tasks, environment.node, environment.global_rank) == (1, 0, 0)


def test_job_environment_names_the_backend() -> None:
    assert PBSJobEnvironment.name() == "pbs" and pbs.PBSExecutor.name() == "pbs"


# --- qstat ------------------------------------------------------------------------------------

PRO_QSTAT = """\
Job Id: 4321.pbs01
    Job_Name = submitit
    Job_Owner = alice@login01
    resources_used.cpupercent = 97
    resources_used.ncpus = 4
    resources_used.walltime = 00:10:02
    job_state = R
    queue = gpu
    server = pbs01
    Account_Name = proj
    exec_host = gpu07/0*4
    Output_Path = login01:/home/alice/jobs/pbs_3f2a.out
    Resource_List.select = 1:ncpus=4:ngpus=1:mem=16gb
    Resource_List.walltime = 02:00:00
    substate = 42
    Variable_List = PBS_O_HOME=/home/alice,PBS_O_LANG=en_US.UTF-8,
\tPBS_O_LOGNAME=alice,PBS_O_PATH=/usr/local/bin:/usr/bin:/bin,
\tPBS_O_WORKDIR=/home/alice/kdbench,PBS_O_QUEUE=gpu,PBS_O_HOST=login01
    euser = alice

Job Id: 4400[1].pbs01
    Job_Name = students
    job_state = Q
    queue = workq
    array_index = 1
    substate = 10

Job Id: 4401.pbs01
    Job_Name = submitit
    job_state = F
    queue = workq
    substate = 92
    Exit_status = 0

Job Id: 4402.pbs01
    job_state = F
    substate = 93
    Exit_status = 1

Job Id: 4403.pbs01
    job_state = F
    substate = 92
    Exit_status = 271
"""

TORQUE_QSTAT = """\
Job Id: 5501.torque01.example.org
    Job_Name = submitit
    Job_Owner = bob@login02.example.org
    resources_used.walltime = 00:00:05
    job_state = C
    queue = batch
    server = torque01.example.org
    Resource_List.nodes = 1:ppn=4
    Resource_List.walltime = 02:00:00
    exit_status = 0
    comp_time = 1709733738

Job Id: 5600[0].torque01.example.org
    Job_Name = students-0
    job_state = R
    job_array_id = 0
"""

WRAPPER_QSTAT = "Job Id:\t61\n\tJob_Name = tiny\n\tJob_Owner = alice@vm\n\tjob_state = C\n\tqueue = debug\n\n"


def test_pro_qstat_records() -> None:
    records = scripts.parse_qstat_full(PRO_QSTAT)
    assert sorted(records) == ["4321", "4400_1", "4401", "4402", "4403"]
    assert records["4321"]["Variable_List"].endswith("PBS_O_QUEUE=gpu,PBS_O_HOST=login01")
    states = {job_id: scripts.state_of(record) for job_id, record in records.items()}
    assert states == {"4321": "RUNNING", "4400_1": "PENDING", "4401": "COMPLETED", "4402": "FAILED", "4403": "CANCELLED"}


def test_torque_and_wrapper_qstat_records() -> None:
    records = {**scripts.parse_qstat_full(TORQUE_QSTAT), **scripts.parse_qstat_full(WRAPPER_QSTAT)}
    assert {job_id: scripts.state_of(record) for job_id, record in records.items()} == {
        "5501": "COMPLETED", "5600_0": "RUNNING", "61": "FAILED",
    }


def test_job_state_asks_qstat_with_x_on_pro(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = [PRO_QSTAT]
    jobs = [pbs.PBSJob(tmp_path, job_id) for job_id in ("4321", "4400_1")]
    assert [job.state for job in jobs] == ["RUNNING", "PENDING"]
    assert scheduler.sent == [["qstat", "-x", "-f", "4321", "4400[1]"]]


def test_result_file_wins_over_the_wrappers_c(tmp_path: Path, scheduler: Scheduler) -> None:
    scheduler.outputs = [WRAPPER_QSTAT, WRAPPER_QSTAT]
    job = pbs.TorqueJob(tmp_path, "61")
    assert job.state == "FAILED"  # C, no exit status, no result file
    utils.cloudpickle_dump(("success", 42), job.paths.result_pickle)
    assert job.state == "COMPLETED" and job.done()
    assert scheduler.sent == [["qstat", "-f", "61"]]


def test_job_forgotten_by_qstat(tmp_path: Path, scheduler: Scheduler) -> None:
    """Torque drops finished jobs: the result file tells how it ended; without one it failed."""
    torque_running = "Job Id: 5700.torque01\n    job_state = R\n"
    scheduler.outputs = [torque_running, "", torque_running, ""]
    done, lost = pbs.TorqueJob(tmp_path, "5700"), pbs.TorqueJob(tmp_path, "5800")
    utils.cloudpickle_dump(("error", "Traceback ..."), done.paths.result_pickle)
    watcher = pbs.TorqueJob.watcher
    watcher.update()
    assert watcher.get_state("5800", mode="cache") == "UNKNOWN"  # never listed yet: maybe not queued yet
    watcher.update()
    assert done.state == "FAILED"
    scheduler.outputs = ["Job Id: 5800.torque01\n    job_state = Q\n", ""]
    watcher.update()
    assert lost.state == "PENDING"
    watcher.update()
    assert lost.state == "FAILED" and lost.done()


def test_cancel_sends_qdel_with_pbs_ids(tmp_path: Path, scheduler: Scheduler) -> None:
    pbs.PBSJob(tmp_path, "4400_2").cancel()
    assert scheduler.sent == [["qdel", "4400[2]"]]


# --- errors, through the real run_command -----------------------------------------------------

def fake_command(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_missing_qsub_names_backend_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pbs.PBSCommandMissing) as error:
        pbs.PBSExecutor(tmp_path / "jobs", python=PYTHON).submit(abs, -1)
    assert str(error.value) == "pbs backend: 'qsub' not found on PATH; run on a PBS or Torque login node"


def test_missing_qstat_is_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(pbs.PBSJob, "watcher", pbs.PBSInfoWatcher("pro"))
    with pytest.raises(pbs.PBSCommandMissing, match="'qstat' not found"):
        pbs.PBSJob(tmp_path, "1").state


def test_qsub_refusal_is_one_line_with_its_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_command(tmp_path, "qsub", 'echo "qsub: Unknown queue" >&2\nexit 170\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    executor = pbs.PBSExecutor(tmp_path / "jobs", python=PYTHON)
    executor.update_parameters(queue="nosuch")
    with pytest.raises(pbs.PBSError) as error:
        executor.submit(abs, -1)
    assert str(error.value) == "pbs backend: qsub failed (exit 170): qsub: Unknown queue"


# --- plugin registration and a whole run through a fake qsub ----------------------------------

@pytest.mark.skipif(not installed(), reason="kdbench is not installed (pip install -e . --no-deps)")
def test_entry_points_register_executor_and_job_environment() -> None:
    from submitit.core import plugins

    assert plugins.get_executors()["pbs"] is pbs.PBSExecutor
    assert isinstance(plugins.get_job_environments()["pbs"], PBSJobEnvironment)


FAKE_QSUB = r"""
# Starts the job in the background at once, as PBS Pro would run it (PBS_JOBID, PBS_ARRAY_INDEX),
# and prints its id; submitit moves the job's pickle into place only after qsub returns.
while getopts "Vo:e:" option; do
    case $option in o) out=$OPTARG ;; e) err=$OPTARG ;; esac
done
shift $((OPTIND - 1))
number=$(( $(cat "$FAKE_PBS_COUNTER" 2>/dev/null || echo 700) + 1 ))
echo $number > "$FAKE_PBS_COUNTER"
last=$(sed -n 's/^#PBS -J 0-\([0-9]*\)$/\1/p' "$1")
if [ -z "$last" ]; then
    PBS_JOBID=$number.fake bash "$1" >> "$out" 2>> "$err" < /dev/null &
    echo "$number.fake"
else
    for index in $(seq 0 "$last"); do
        PBS_JOBID="$number[$index].fake" PBS_ARRAY_INDEX=$index PBS_ARRAY_ID="$number[].fake" \
            bash "$1" >> "$out" 2>> "$err" < /dev/null &
    done
    echo "$number[].fake"
fi
"""


def shout(text: str) -> str:
    print(f"stdout of {text}")
    if text == "boom":
        raise ValueError("boom")
    return text.upper()


@pytest.mark.skipif(not installed(), reason="kdbench is not installed (pip install -e . --no-deps)")
def test_jobs_run_through_a_fake_qsub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    fake_command(bin_folder, "qsub", FAKE_QSUB)
    fake_command(bin_folder, "qstat", "exit 153\n")
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PBS_COUNTER", str(tmp_path / "counter"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(pbs.PBSJob, "watcher", pbs.PBSInfoWatcher("pro"))
    executor = pbs.PBSExecutor(tmp_path / "jobs" / "%j", python=sys.executable)
    single = executor.submit(shout, "one")
    with executor.batch():
        array = [executor.submit(shout, text) for text in ("a", "boom")]
    assert single.job_id == "701" and single.result() == "ONE"
    assert "stdout of one" in single.stdout()
    assert [job.job_id for job in array] == ["702_0", "702_1"]
    assert array[0].result() == "A" and array[0].state == "COMPLETED"
    error = array[1].exception()  # waits for the task: until its result file appears its state is UNKNOWN
    assert "ValueError: boom" in str(error) and array[1].state == "FAILED"


# --- the cluster backend's scheduler ------------------------------------------------------------

def test_scheduler_maps_sweep_resources(tmp_path: Path, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pbs.shutil, "which", lambda name: f"/usr/bin/{name}")
    resources = {"time_min": 720, "cpus": 4, "gpus": 1, "mem_gb": 16, "queue": "gpuq", "account": "proj",
                 "partition": "ignored", "pbs_dialect": "torque"}
    pbs_scheduler = pbs.PBSScheduler(slurm_wrappers=False)
    after = sorted({pbs_scheduler.dependency_id(job_id) for job_id in ("101_0", "101_1", "99")})
    assert after == ["101[]", "99"] and not pbs_scheduler.task_dependencies
    executor = pbs_scheduler.executor(tmp_path, resources, after, "tiny-train_student")
    assert executor.dialect == "torque"
    assert executor.parameters == {
        "job_name": "tiny-train_student", "timeout_min": 720, "cpus_per_task": 4, "gpus_per_node": 1, "mem_gb": 16.0,
        "queue": "gpuq", "account": "proj", "dependency": ["101[]", "99"], "dependency_type": "afterany",
    }


def test_scheduler_live_jobs_and_cancel(scheduler: Scheduler) -> None:
    scheduler.outputs = [PRO_QSTAT]
    pbs_scheduler = pbs.PBSScheduler(slurm_wrappers=False)
    live = pbs_scheduler.live_jobs(["4321", "4400_1", "4999"])
    assert (live["4321"], live["4400_1"], "4999" in live) == ("RUNNING", "PENDING", False)
    pbs_scheduler.cancel(["4321", "4400_1"])
    assert scheduler.sent == [["qstat", "-f", "4321", "4400[1]", "4999"], ["qdel", "4321", "4400[1]"]]
    assert pbs_scheduler.calls == 2

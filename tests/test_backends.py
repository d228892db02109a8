"""Backend behaviour that needs no running scheduler: resource mapping, idempotence, the lock,
a killed submit, per-task waits, refusals, ``--wait`` and clear errors when a scheduler's commands are missing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from submitit.core.utils import JobPaths

from pipeline import status as status_module
from pipeline.backends import BackendError, slurm
from pipeline.backends.cluster import ClusterBackend, array_groups
from pipeline.backends.slurm import SlurmScheduler, sbatch_parameters
from pipeline.manifest import Manifest, SubmitLockedError, submit_lock
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from pipeline.status import sweep_status
from tests.conftest import REPO, write_sweep


class FakeJob:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.job_id = ""

    @property
    def paths(self) -> JobPaths:
        return JobPaths(self.folder, job_id=self.job_id)


class FakeArrayExecutor:
    """The part of a submitit executor the backend uses (``batch``, ``submit``); nothing runs.

    A batch takes the scheduler's next sequence number: its tasks are ``<n>_<i>``, a batch of one is
    ``<n>``, as sbatch and qsub number them. A refused batch leaves a pickle where submitit dumps them
    and prints the scheduler's stderr before raising, as submitit's CommandFunction does.
    """

    def __init__(self, scheduler: "RecordingScheduler", folder: Path, refusal: str | None) -> None:
        self.scheduler, self.folder, self.refusal = scheduler, folder, refusal
        self.pending: list[FakeJob] = []

    @contextmanager
    def batch(self) -> Iterator[None]:
        yield
        if self.refusal:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            (self.folder.parent / "0123abcd.pkl").write_bytes(b"pickle")
            print(self.refusal, file=sys.stderr)
            raise RuntimeError(self.refusal)
        number = self.scheduler.next_id()
        for index, job in enumerate(self.pending):
            job.job_id = str(number) if len(self.pending) == 1 else f"{number}_{index}"

    def submit(self, function: Any, *args: Any) -> FakeJob:
        job = FakeJob(self.folder)
        self.pending.append(job)
        return job


class RecordingScheduler:
    """A Slurm-like scheduler whose arrays are recorded (nothing runs) and whose queue is a dict."""

    name = "slurm"
    task_dependencies = True

    def __init__(self, folder: Path, die_on_array: int | None = None, refuse_kind: str | None = None, refusal: str = ""):
        self.folder = folder
        self.calls = 0
        self.die_on_array = die_on_array
        self.refuse_kind, self.refusal = refuse_kind, refusal
        self.afters: list[list[str]] = []
        self.arrays: list[tuple[str, tuple[str, ...]]] = []  # (job name, after) of each executor
        self.narrowed: dict[str, list[str]] = {}
        self.cancelled: list[str] = []
        self.queue: dict[str, str] = {}
        self._last_id = 0

    def next_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def dependency_id(self, job_id: str) -> str:
        return job_id

    def executor(self, folder: Path, resources: dict[str, Any], after: list[str], job_name: str) -> FakeArrayExecutor:
        self.calls += 1
        if len(self.afters) + 1 == self.die_on_array:
            raise KeyboardInterrupt  # the submitting process dies between two arrays
        self.afters.append(after)
        self.arrays.append((job_name, tuple(after)))
        refused = self.refuse_kind is not None and job_name.endswith(self.refuse_kind)
        return FakeArrayExecutor(self, folder, self.refusal if refused else None)

    def set_task_dependencies(self, waits: dict[str, list[str]]) -> list[str]:
        self.calls += 1
        self.narrowed.update(waits)
        return []

    def live_jobs(self, job_ids: list[str]) -> dict[str, str]:
        return {job_id: self.queue[job_id] for job_id in job_ids if job_id in self.queue}

    def cancel(self, job_ids: list[str]) -> None:
        self.cancelled += job_ids
        for job_id in job_ids:
            self.queue.pop(job_id, None)


class WholeArrayScheduler(RecordingScheduler):
    """PBS-like: dependencies name whole arrays (``7[]`` for task ``7_1``), tasks cannot be given their own."""

    name = "pbs"
    task_dependencies = False

    def dependency_id(self, job_id: str) -> str:
        return f"{job_id.split('_')[0]}[]" if "_" in job_id else job_id


def noop(spec: dict, root: str) -> str:
    return spec["name"]


def test_resources_map_to_sbatch_options() -> None:
    parameters = sbatch_parameters({
        "time_min": 720, "cpus": 8, "gpus": 2, "mem_gb": 15.5, "partition": "gpu", "account": "proj",
        "qos": "high", "constraint": "a100", "extra_sbatch": ["--exclude=node13", "--exclusive"],
    })
    assert parameters["time"] == 720 and parameters["cpus_per_task"] == 8 and parameters["gpus_per_node"] == 2
    assert parameters["mem"] == "15872MB"
    assert (parameters["partition"], parameters["account"], parameters["qos"], parameters["constraint"]) == ("gpu", "proj", "high", "a100")
    assert parameters["additional_parameters"] == {"requeue": True, "exclude": "node13", "exclusive": True}
    assert parameters["signal_delay_s"] == 90
    assert sbatch_parameters({"time_min": 1})["signal_delay_s"] == 10  # shorter than the job itself
    assert "gpus_per_node" not in sbatch_parameters({"gpus": 0})


def test_one_array_per_kind_in_dependency_order(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["vanilla", "kd", "ft", "tucker"], "axes.seed": [0, 1],
                                              "defaults.methods": {"ft": {"paraphraser_epochs": 1}}})
    plan = build_plan(sweep)
    groups = array_groups(list(plan.stages.values()))
    assert [group[0].kind for group in groups] == ["train_teacher", "pretrain_paraphraser", "train_student", "evaluate"]
    assert [len(group) for group in groups] == [1, 1, 8, 9]

    scheduler = RecordingScheduler(tmp_path / "debug")
    summary = ClusterBackend(scheduler, tmp_path / "out", tmp_path / "jobs", noop, report=lambda _: None).submit(plan)
    assert summary.arrays == 4 and len(summary.submitted) == len(plan.stages)
    assert scheduler.calls == 6  # four arrays, and one call each narrowing the students' and evaluates' waits
    teacher_job = summary.submitted[groups[0][0].name]
    assert scheduler.afters[0] == [] and teacher_job in scheduler.afters[1]  # the paraphraser array waits on the teacher
    assert set(scheduler.afters[3]) >= {summary.submitted[spec.name] for spec in groups[2]}  # evaluates wait on students


def test_a_killed_submit_leaves_a_manifest_the_next_submit_reads(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["vanilla", "kd"]})
    plan = build_plan(sweep)
    jobs_dir = tmp_path / "jobs"
    dying = RecordingScheduler(tmp_path / "debug", die_on_array=3)
    with pytest.raises(KeyboardInterrupt):
        ClusterBackend(dying, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan)
    recorded = Manifest.load(jobs_dir).stages  # valid JSON: written whole after each array
    first_two = {spec.name for group in array_groups(list(plan.stages.values()))[:2] for spec in group}
    assert set(recorded) == first_two

    alive = RecordingScheduler(tmp_path / "debug")
    alive.queue = {entry["job_id"]: "PENDING" for entry in recorded.values()}
    summary = ClusterBackend(alive, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan)
    assert set(summary.skipped_live) == first_two  # still queued: not submitted twice
    assert set(summary.submitted) == set(plan.stages) - first_two


def test_a_second_submit_of_the_same_sweep_is_refused_while_one_runs(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml")
    root = tmp_path / "out"
    with submit_lock(root / "jobs" / "tiny"):
        with pytest.raises(SubmitLockedError):
            with submit_lock(root / "jobs" / "tiny"):
                pass
        result = subprocess.run([sys.executable, str(REPO / "runner.py"), "submit", str(sweep), "--root", str(root)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "another submit of this sweep (pid " in result.stderr
    assert not (root / "logs").exists()


@pytest.mark.parametrize("backend, command", [("slurm", "sbatch"), ("pbs", "qsub")])
def test_missing_scheduler_commands_are_named(backend: str, command: str, tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml")
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    environment = dict(os.environ, PATH=str(empty_bin))
    result = subprocess.run([sys.executable, str(REPO / "runner.py"), "submit", str(sweep), "--backend", backend,
                             "--root", str(tmp_path / "out")], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"{backend} backend: '{command}' not found on PATH" in result.stderr


def test_local_status_reads_the_same_manifest(tiny_submitted, capsys: pytest.CaptureFixture[str]) -> None:
    import runner

    code = runner.main(["status", str(tiny_submitted.sweep), "--root", str(tiny_submitted.root)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[-1] == f"{len(build_plan(tiny_submitted.sweep).stages)} done"


def test_local_cancel_stops_a_running_stage_and_blocks_its_dependants(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["kd"], "defaults.teacher.epochs": 500})
    root = tmp_path / "out"
    runner_py = str(REPO / "runner.py")
    # Started ignoring SIGINT, as a script's `runner.py submit ... &` is: cancel must still stop it.
    # In its own process group, so a failing test can kill the job controllers with it (they hold
    # its pipes open: killing the submit alone left communicate() waiting for 500 epochs).
    submit = subprocess.Popen([sys.executable, runner_py, "submit", str(sweep), "--root", str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _cancel_the_running_teacher(submit, sweep, root)
    finally:
        _kill_process_group(submit.pid)


def _kill_process_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:  # everything in it has ended
        pass


def _cancel_the_running_teacher(submit: subprocess.Popen, sweep: Path, root: Path) -> None:
    runner_py = str(REPO / "runner.py")
    plan = build_plan(sweep)
    teacher = plan.experiments[0].teacher_stage
    jobs_dir = root / "jobs" / "tiny"
    deadline = time.monotonic() + 120
    # Running, and past its start-up: its first epoch is logged.
    while Manifest.load(jobs_dir).stages.get(teacher, {}).get("state") != "running" or not StageFolders(root, teacher).log.is_file():
        assert time.monotonic() < deadline and submit.poll() is None, "the teacher never started"
        time.sleep(0.2)

    cancel = subprocess.run([sys.executable, runner_py, "cancel", str(sweep), "--root", str(root)],
                            capture_output=True, text=True, timeout=120)
    assert cancel.returncode == 0 and "cancelled 1 stage(s)" in cancel.stdout, cancel.stdout + cancel.stderr
    try:  # communicate, not wait: the submit's output is read as it comes, so no full pipe can stall it
        output, errors = submit.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_process_group(submit.pid)
        output, errors = submit.communicate()
        raise AssertionError(f"the submit did not end within 120 s of the cancel:\n{output[-3000:]}\n{errors[-3000:]}") from None
    assert submit.returncode == 1, output + errors  # the submit ends: its teacher was cancelled, the rest blocked

    status = subprocess.run([sys.executable, runner_py, "status", str(sweep), "--root", str(root)],
                            capture_output=True, text=True, timeout=120)
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:-1]}
    assert states[teacher] == "cancelled"
    assert states[plan.experiments[0].student_stage] == "blocked"


def test_resubmitting_a_failed_stage_replaces_its_queued_dependants(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["kd"]})
    plan = build_plan(sweep)
    jobs_dir = tmp_path / "jobs"
    first = RecordingScheduler(tmp_path / "debug")
    submitted = ClusterBackend(first, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan).submitted
    teacher = plan.experiments[0].teacher_stage

    again = RecordingScheduler(tmp_path / "debug")  # the teacher failed and left the queue; the rest still wait
    again.queue = {job: "PENDING" for name, job in submitted.items() if name != teacher}
    summary = ClusterBackend(again, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan)
    assert set(summary.submitted) == set(plan.stages)  # the teacher and everything downstream of it
    assert again.queue == {}  # the old dependants were cancelled


def test_a_stage_whose_job_finished_after_the_pending_check_is_not_submitted_again(tmp_path: Path) -> None:
    """Two sweeps share a teacher: the first sweep's teacher job writes DONE and leaves the queue
    while the second submit is between its pending check and its scheduler query (preflight runs
    in between). The teacher must not go out a second time; its dependants need not wait on it."""
    from pipeline.pending import stages_to_run

    plan = build_plan(write_sweep(tmp_path / "s.yaml", {"axes.method": ["kd"]}))
    root, teacher = tmp_path / "out", plan.experiments[0].teacher_stage
    to_run = stages_to_run(plan, root)
    assert to_run[teacher] == "not built"
    StageFolders(root, teacher).logs.mkdir(parents=True)
    StageFolders(root, teacher).mark_done()  # the job finished; the queue (empty) no longer lists it
    scheduler = RecordingScheduler(tmp_path / "debug")
    summary = ClusterBackend(scheduler, root, tmp_path / "jobs", noop, report=lambda _: None).submit(plan, to_run)
    assert teacher in summary.skipped_done and teacher not in summary.submitted
    assert set(summary.submitted) == set(plan.stages) - {teacher}
    assert scheduler.arrays[0] == ("tiny-train_student", ())  # the student waits on no teacher job


TWO_TEACHERS = {"axes.pair": ["resnet20:resnet8x0.25", "resnet56:resnet8x0.25"], "axes.method": ["vanilla", "kd"]}


def test_each_task_waits_only_on_its_own_upstream_jobs(tmp_path: Path) -> None:
    """One array per kind, each task then narrowed to its own upstream jobs: a vanilla student waits for
    no teacher, a kd student for its own teacher, an evaluate for its own student and teacher."""
    plan = build_plan(write_sweep(tmp_path / "s.yaml", TWO_TEACHERS))
    scheduler = RecordingScheduler(tmp_path / "debug")
    jobs_dir = tmp_path / "jobs"
    summary = ClusterBackend(scheduler, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan)
    job = summary.submitted
    assert summary.arrays == 3  # teachers, students, evaluates (teacher evaluates included)
    teachers = [name for name, spec in plan.stages.items() if spec.kind == "train_teacher"]
    assert scheduler.arrays[1] == ("tiny-train_student", tuple(sorted(job[name] for name in teachers)))

    own = {name: sorted(job[up] for up in spec.upstream.values()) for name, spec in plan.stages.items()}
    vanilla = next(experiment.student_stage for experiment in plan.experiments if experiment.method == "vanilla")
    assert own[vanilla] == [] and scheduler.narrowed[job[vanilla]] == []
    for name, spec in plan.stages.items():
        array_after = next(after for kind_name, after in scheduler.arrays if kind_name.endswith(spec.kind))
        assert scheduler.narrowed.get(job[name], list(array_after)) == own[name], name
        assert Manifest.load(jobs_dir).stages[name]["after"] == own[name]
    assert scheduler.calls == 5  # three arrays, and one narrowing call each for students and evaluates


def test_without_task_dependencies_arrays_split_by_the_upstream_arrays_they_wait_on(tmp_path: Path) -> None:
    """PBS names whole arrays in dependencies; a kind's stages split into one array per set of upstream arrays."""
    plan = build_plan(write_sweep(tmp_path / "s.yaml", TWO_TEACHERS))
    scheduler = WholeArrayScheduler(tmp_path / "debug")
    summary = ClusterBackend(scheduler, tmp_path / "out", tmp_path / "jobs", noop, report=lambda _: None).submit(plan)
    assert scheduler.narrowed == {}
    sizes: dict[str, int] = {}
    for job_id in summary.submitted.values():
        sizes[job_id.split("_")[0]] = sizes.get(job_id.split("_")[0], 0) + 1
    # teachers: array 1; the vanilla student: job 2; kd students: array 3; then three evaluate arrays.
    assert scheduler.arrays == [
        ("tiny-train_teacher", ()),
        ("tiny-train_student", ()),
        ("tiny-train_student", ("1[]",)),
        ("tiny-evaluate", ("1[]",)),
        ("tiny-evaluate", ("1[]", "2")),
        ("tiny-evaluate", ("1[]", "3[]")),
    ]
    assert sizes == {"1": 2, "2": 1, "3": 2, "4": 2, "5": 2, "6": 2}


def test_slurm_gives_tasks_their_own_waits_in_one_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []

    def scontrol(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        sent.append((argv, stdin))
        refusals = "7_1: Job is no longer pending execution\n7_2: Invalid job id specified\n"
        return subprocess.CompletedProcess(argv, 1, "", refusals)

    monkeypatch.setattr(slurm, "run_command", scontrol)
    scheduler = SlurmScheduler()
    problems = scheduler.set_task_dependencies({"7_0": [], "7_1": ["5_0"], "7_2": ["5_0", "6"]})
    assert sent == [(["scontrol"], (
        "update JobId=7_0 Dependency=\n"  # empty: no wait at all
        "update JobId=7_1 Dependency=afterany:5_0\n"
        "update JobId=7_2 Dependency=afterany:5_0:6\n"
    ))]
    assert problems == ["7_2: Invalid job id specified"]  # 7_1 had started: its wait was over anyway
    assert scheduler.calls == 1 and scheduler.set_task_dependencies({}) == [] and scheduler.calls == 1


REFUSAL = "sbatch: error: Batch job submission failed: Invalid partition name specified"


def test_a_refusal_is_one_error_recorded_with_its_reason_and_leaves_no_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = build_plan(write_sweep(tmp_path / "s.yaml", {"axes.method": ["kd"]}))
    root, jobs_dir = tmp_path / "out", tmp_path / "out" / "jobs" / "tiny"
    scheduler = RecordingScheduler(tmp_path / "debug", refuse_kind="train_student", refusal=REFUSAL)
    with pytest.raises(BackendError) as error:
        ClusterBackend(scheduler, root, jobs_dir, noop, report=lambda _: None).submit(plan)
    assert str(error.value) == f"slurm refused the train_student array: {REFUSAL}"
    assert capsys.readouterr().err == ""  # the scheduler's own stderr is inside the error, not printed
    experiment = plan.experiments[0]
    manifest = Manifest.load(jobs_dir).stages
    assert scheduler.cancelled == [manifest[experiment.teacher_stage]["job_id"]]
    assert manifest[experiment.student_stage]["state"] == "refused"
    assert {manifest[name]["state"] for name in plan.stages if name != experiment.student_stage} == {"rolled back"}
    assert all(manifest[name]["reason"] == REFUSAL for name in plan.stages)
    assert not any(path.is_file() for path in (jobs_dir / "slurm").rglob("*"))  # submitit's pickles and scripts

    statuses = {status.name: status for status in sweep_status(plan, root, Manifest.load(jobs_dir), lambda *_: {})}
    refused = statuses[experiment.student_stage]
    assert (refused.state, refused.detail) == ("refused", f"refused by scheduler: {REFUSAL}")
    teacher = statuses[experiment.teacher_stage]
    assert teacher.state == "rolled back"
    assert teacher.detail == f"rolled back: the train_student array was refused by scheduler: {REFUSAL}"


def test_wait_returns_only_once_no_recorded_job_is_in_the_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed teacher shows its students blocked while their tasks still pend (afterany lets them start
    later, to fail on the missing teacher); ``--wait`` must not return before they leave the queue."""
    plan = build_plan(write_sweep(tmp_path / "s.yaml", {"axes.method": ["kd"]}))
    root = tmp_path / "out"
    jobs_dir = root / "jobs" / "tiny"
    experiment = plan.experiments[0]
    job_ids = {experiment.teacher_stage: "1", experiment.teacher_evaluate_stage: "3_0",
               experiment.student_stage: "2", experiment.evaluate_stage: "3_1"}
    Manifest(jobs_dir / "manifest.json", {
        name: {"kind": plan.stages[name].kind, "backend": "slurm", "job_id": job_id, "state": "submitted"}
        for name, job_id in job_ids.items()
    }).save()
    polls = []

    def queue(backend: str, asked: list[str]) -> dict[str, str]:
        polls.append(asked)
        still_pending = {"2": "PENDING", "3_0": "PENDING", "3_1": "PENDING"} if len(polls) < 3 else {}
        return {job_id: state for job_id, state in still_pending.items() if job_id in asked}

    monkeypatch.setattr(status_module, "live_jobs", queue)
    assert status_module.wait_for(plan, root, poll_seconds=0) is False
    assert len(polls) == 3

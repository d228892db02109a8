"""The text the PBS backend sends: ``#PBS`` scripts, qsub/qstat/qdel argv, job ids, ``qstat -f`` parsing.

Pure functions, no subprocess and no disk, so tests can compare whole scripts and argv.

Two dialects:

* ``pro`` (PBS Pro / OpenPBS): ``-l select=1:ncpus=N:ngpus=G:mem=Mgb``, arrays ``-J 0-N`` (at least two
  subjobs), finished jobs still listed by ``qstat -x``.
* ``torque``: ``-l nodes=1:ppn=N:gpus=G`` plus ``-l mem=Mgb``, arrays ``-t 0-N``, ``qstat`` without ``-x``.
  Slurm's Torque wrappers (Debian's slurm-wlm-torque) take this dialect.

Job ids. Schedulers print ``123.server``, ``123[].server`` (an array), ``123[4].server`` (a subjob) or,
through Slurm's wrappers, a bare ``123``. submitit's id for a job is the sequence number alone
(``123``), and for array task 4 it is ``123_4``: the same form as SlurmExecutor's, so submitit's
``%j`` and ``%A_%a`` path substitution work unchanged, and the job finds the same id from its own
environment whatever server suffix the site prints. Commands address jobs as ``123`` or ``123[4]``
on the default server; dependencies name whole arrays, ``123[]`` (see ``dependency_line``).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path

DIALECTS = ("pro", "torque")
DEPENDENCY_TYPES = ("afterok", "afterany")
UNKNOWN_JOB_EXIT = 153
"""qstat's exit status when an asked id is unknown (PBSE_UNKJOBID 15001 mod 256); Slurm's wrapper uses it too."""

ARRAY_VARIABLES = ("PBS_ARRAY_INDEX", "PBS_ARRAYID", "PBS_ARRAY_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_JOB_ID")
"""Where a job learns it is an array task (see pbs_job.py)."""
_JOB_ID = re.compile(r"^(?P<sequence>\d+)(?:\[(?P<index>\d*)\])?(?:\.(?P<server>\S+))?$")
_ATTRIBUTE = re.compile(r"^\s+(?P<key>[A-Za-z_][\w.]*) = (?P<value>.*)$")


@dataclass(frozen=True)
class PBSRequest:
    """What one submission asks for; every field is a parameter of ``PBSExecutor.update_parameters``."""

    job_name: str = "submitit"
    timeout_min: int = 5
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float | None = None
    queue: str | None = None
    account: str | None = None
    dependency: tuple[str, ...] = ()
    dependency_type: str = "afterok"
    setup: tuple[str, ...] = ()
    directives: tuple[str, ...] = ()
    """Extra ``#PBS`` lines for site needs, written verbatim after ``#PBS `` (``-l place=scatter``)."""


PARAMETERS = tuple(field.name for field in fields(PBSRequest))


def check_dialect(dialect: str) -> str:
    if dialect not in DIALECTS:
        raise ValueError(f"pbs backend: dialect {dialect!r} is not one of {', '.join(DIALECTS)}")
    return dialect


def make_request(parameters: dict) -> PBSRequest:
    """A checked ``PBSRequest``; a wrong key or value fails in one line naming it and the allowed ones."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"pbs backend: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(PARAMETERS)}")
    values = dict(parameters)
    for key in ("dependency", "setup", "directives"):
        if key in values:
            if isinstance(values[key], str):
                raise ValueError(f"pbs backend: {key} must be a list of strings, not the string {values[key]!r}")
            values[key] = tuple(str(item) for item in values[key])
    request = PBSRequest(**values)
    if not request.job_name or any(character.isspace() for character in request.job_name):
        raise ValueError(f"pbs backend: job_name must be one word without spaces, got {request.job_name!r}")
    if request.dependency_type not in DEPENDENCY_TYPES:
        raise ValueError(
            f"pbs backend: dependency_type {request.dependency_type!r} is not one of {', '.join(DEPENDENCY_TYPES)}"
        )
    for key in ("timeout_min", "cpus_per_task"):
        if int(getattr(request, key)) < 1:
            raise ValueError(f"pbs backend: {key} must be at least 1, got {getattr(request, key)!r}")
    if int(request.gpus_per_node) < 0:
        raise ValueError(f"pbs backend: gpus_per_node must be 0 or more, got {request.gpus_per_node!r}")
    return request


def walltime(timeout_min: int) -> str:
    """``HH:MM:SS``; hours go past 24 rather than into a day field, as both dialects accept."""
    minutes = int(timeout_min)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def memory(mem_gb: float) -> str:
    """Whole gigabytes as ``16gb``, anything else in megabytes (``512mb``): PBS sizes are integers."""
    if float(mem_gb) == int(mem_gb):
        return f"{int(mem_gb)}gb"
    return f"{int(float(mem_gb) * 1024)}mb"


def resource_lines(request: PBSRequest, dialect: str) -> list[str]:
    cpus, gpus = int(request.cpus_per_task), int(request.gpus_per_node)
    if dialect == "pro":
        chunk = f"select=1:ncpus={cpus}"
        if gpus:
            chunk += f":ngpus={gpus}"
        if request.mem_gb is not None:
            chunk += f":mem={memory(request.mem_gb)}"
        return [f"-l {chunk}"]
    lines = [f"-l nodes=1:ppn={cpus}" + (f":gpus={gpus}" if gpus else "")]
    if request.mem_gb is not None:
        lines.append(f"-l mem={memory(request.mem_gb)}")
    return lines


def array_line(dialect: str, size: int) -> str:
    """The array directive for ``size`` subjobs indexed from 0 (PBS Pro refuses ``-J`` for fewer than 2)."""
    if size < 2:
        raise ValueError(f"pbs backend: an array needs at least 2 jobs, got {size}")
    return f"-J 0-{size - 1}" if dialect == "pro" else f"-t 0-{size - 1}"


def split_job_id(job_id: str) -> tuple[str, str | None]:
    """(sequence number, array index or None) of any id form: ``123``, ``123_4``, ``123[4].server``..."""
    text = job_id.strip()
    if "_" in text:
        sequence, index = text.split("_", 1)
        if sequence.isdigit() and index.isdigit():
            return sequence, index
    match = _JOB_ID.match(text)
    if match is None:
        raise ValueError(f"pbs backend: cannot read a job id from {job_id!r}")
    return match["sequence"], match["index"] or None


def submitit_id(job_id: str) -> str:
    """submitit's id for a job: ``123`` or, for an array task, ``123_4``."""
    sequence, index = split_job_id(job_id)
    return sequence if index is None else f"{sequence}_{index}"


def scheduler_id(job_id: str) -> str:
    """How qstat and qdel address a job on the default server: ``123`` or ``123[4]``."""
    sequence, index = split_job_id(job_id)
    return sequence if index is None else f"{sequence}[{index}]"


def whole_array(job_id: str) -> str:
    """What a dependency on ``job_id`` can name: a job (``123``) itself, a subjob (``123_4``) only as its whole
    array (``123[]``). PBS Pro and Torque document dependencies on jobs and whole arrays, none on a subjob."""
    match = _JOB_ID.match(job_id.strip())
    if match is not None and match["index"] == "":
        return f"{match['sequence']}[]"
    sequence, index = split_job_id(job_id)
    return sequence if index is None else f"{sequence}[]"


def dependency_line(job_ids: tuple[str, ...], dependency_type: str, dialect: str, slurm_wrappers: bool = False) -> str:
    """``-W depend=...`` on the jobs and whole arrays ``job_ids`` name (a subjob id stands for its array),
    written as each dialect documents it:

    * pro: ``afterany:101:102[]``. PBS Pro's qsub(1B) takes PBS job ids, an array's id being ``102[]``; its
      User's Guide supports no dependency on subjobs or ranges of subjobs.
    * torque: ``afterany:101,afteranyarray:102[]``. Torque's qsub(1) has the ``afterokarray`` and
      ``afteranyarray`` types for arrays (``afteranyarray:arrayid[count]``) and documents no dependency
      on a single subjob; each array gets its own entry, as in its example.
    * Slurm's wrappers hand the list to sbatch, which reads a bare array id as the whole array:
      ``afterany:101:102``.
    """
    targets = list(dict.fromkeys(whole_array(job_id) for job_id in job_ids))
    if slurm_wrappers:
        return f"-W depend={dependency_type}:" + ":".join(target.removesuffix("[]") for target in targets)
    if dialect == "pro":
        return f"-W depend={dependency_type}:" + ":".join(targets)
    jobs = [target for target in targets if not target.endswith("[]")]
    entries = [f"{dependency_type}:" + ":".join(jobs)] if jobs else []
    entries += [f"{dependency_type}array:{target}" for target in targets if target.endswith("[]")]
    return "-W depend=" + ",".join(entries)


def submission_script(
    request: PBSRequest, dialect: str, command: str, array_size: int | None = None, slurm_wrappers: bool = False
) -> str:
    """The whole batch script. Logs are not set here: qsub gets ``-o``/``-e`` (see ``qsub_argv``)."""
    directives = [f"-N {request.job_name}", *resource_lines(request, dialect), f"-l walltime={walltime(request.timeout_min)}"]
    if request.queue:
        directives.append(f"-q {request.queue}")
    if request.account:
        directives.append(f"-A {request.account}")
    if array_size is not None:
        directives.append(array_line(dialect, array_size))
    if request.dependency:
        directives.append(dependency_line(request.dependency, request.dependency_type, dialect, slurm_wrappers))
    directives.extend(request.directives)
    lines = ["#!/bin/bash", *(f"#PBS {directive}" for directive in directives), ""]
    lines.append('cd "${PBS_O_WORKDIR:-.}"')  # PBS starts jobs in $HOME; run where qsub ran, as Slurm does
    if array_size is None:
        # -V exports the submitter's environment: a job submitted from inside an array task must not
        # inherit that task's index, or it would look for its files under the wrong id.
        lines.append(f"unset {' '.join(ARRAY_VARIABLES)}")
    lines.extend(request.setup)
    lines += ["export SUBMITIT_EXECUTOR=pbs", command, ""]
    return "\n".join(lines)


def scheduler_log_paths(folder: Path, uid: str, dialect: str, array: bool, slurm_wrappers: bool = False) -> tuple[str, str]:
    """Where the scheduler itself writes the batch script's stdout and stderr (``-o``/``-e``).

    These files only catch what happens before Python starts (setup lines, a missing interpreter):
    the job redirects its own output into submitit's ``<id>_0_log.out``/``.err`` (see pbs_job.py),
    because PBS cannot put a job id into an ``-o`` path. Arrays: PBS Pro substitutes
    ``^array_index^``, Torque appends ``-<index>`` itself, sbatch (behind the wrappers) expands ``%a``.
    """
    suffix = ""
    if array and dialect == "pro":
        suffix = "_^array_index^"
    elif array and slurm_wrappers:
        suffix = "_%a"
    stem = folder / f"pbs_{uid}{suffix}"
    return f"{stem}.out", f"{stem}.err"


def qsub_argv(script: Path, stdout: str, stderr: str) -> list[str]:
    """``-V`` exports the submitting environment (Slurm's qsub drops it otherwise); ``-o``/``-e`` are on the
    command line because Slurm's qsub overrides ``#PBS -o``/``-e`` with its own defaults."""
    return ["qsub", "-V", "-o", stdout, "-e", stderr, str(script)]


def qstat_argv(dialect: str, job_ids: list[str]) -> list[str]:
    """Full records of these jobs; PBS Pro needs ``-x`` to keep showing finished ones."""
    flags = ["-x", "-f"] if dialect == "pro" else ["-f"]
    return ["qstat", *flags, *(scheduler_id(job_id) for job_id in job_ids)]


def qdel_argv(job_ids: list[str]) -> list[str]:
    return ["qdel", *(scheduler_id(job_id) for job_id in job_ids)]


def job_id_from_qsub(output: str) -> str:
    """submitit's id from qsub's output, whose last non-empty line is the new job's id."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines or _JOB_ID.match(lines[-1].split()[-1]) is None:
        raise ValueError(f"pbs backend: qsub printed no job id: {' '.join(output.split())!r}")
    return split_job_id(lines[-1].split()[-1])[0]


def parse_qstat_full(output: str) -> dict[str, dict[str, str]]:
    """``qstat -f`` text -> {submitit id: {attribute: value}}; wrapped values are joined back.

    Array parents (``123[]``) are left out: only single jobs and subjobs are asked for.
    """
    records: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last_key = ""
    for line in output.splitlines():
        if line.startswith("Job Id:"):
            raw = line.split(":", 1)[1].strip()
            current = {"Job Id": raw}
            if not re.match(r"^\d+\[\]", raw):
                records[submitit_id(raw)] = current
            last_key = ""
            continue
        if current is None or not line.strip():
            continue
        attribute = _ATTRIBUTE.match(line)
        if attribute:
            last_key = attribute["key"]
            current[last_key] = attribute["value"].strip()
        elif last_key:
            current[last_key] += line.strip()
    return records


def state_of(record: dict[str, str]) -> str:
    """A submitit-like state from one ``qstat -f`` record.

    Q/H/W/T/M wait, R/E/B/S have started, F/C/X are over. A finished job's outcome comes from its
    exit status (``Exit_status`` in PBS Pro, ``exit_status`` in Torque): 0 COMPLETED, 271 (256 +
    SIGTERM, what qdel sends) CANCELLED, anything else or none FAILED. The caller trusts submitit's
    result file over this, since Slurm's wrappers print C for every finished job and no exit status.
    """
    code = record.get("job_state", "").strip()[:1].upper()
    if code in ("Q", "H", "W", "T", "M"):
        return "PENDING"
    if code in ("R", "E", "B", "S"):
        return "RUNNING"
    if code in ("F", "C", "X"):
        status = next((value for key, value in record.items() if key.lower() == "exit_status"), "")
        if status.strip() == "0":
            return "COMPLETED"
        if status.strip() == "271":
            return "CANCELLED"
        return "FAILED"
    return "UNKNOWN"


def shell_command(python: str, folder: Path) -> str:
    """What the script runs: the job-side entry point (pbs_job.py) with submitit's folder."""
    return f"{python} -u -m pipeline.backends.pbs_job {shlex.quote(str(folder))}"

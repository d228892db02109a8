#!/usr/bin/env python3
"""kdbench command line: plan, run and read knowledge-distillation sweeps.

Only parsing, calling and printing live here; the work is in pipeline/ (plan, backends, read side)
and stages/ (what a job runs). Commands that only read files never import torch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from data.errors import DatasetError  # noqa: E402
from pipeline.backends import BackendError  # noqa: E402
from pipeline.catalogue import CatalogueError  # noqa: E402
from pipeline.leases import LeaseLostError, live_lease  # noqa: E402
from pipeline.logfiles import LogError  # noqa: E402
from pipeline.manifest import SubmitLockedError, submit_lock  # noqa: E402
from pipeline.pending import PreflightVerdicts, stages_to_run  # noqa: E402
from pipeline.plan import Plan, StageSpec, build_plan  # noqa: E402
from pipeline.store import CorruptFileError, StageFolders, read_json  # noqa: E402
from pipeline.sweep import SweepError  # noqa: E402
from pipeline.sweep_schema import STAGE_KINDS  # noqa: E402

DEMO_SWEEP = REPO / "configs" / "demo.yaml"


def output_root(args: argparse.Namespace) -> Path:
    return Path(args.root or os.environ.get("KDBENCH_ROOT") or REPO).resolve()


def command_plan(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    plan = build_plan(Path(args.sweep))
    print(plan.format())
    kinds = {}
    for spec in plan.stages.values():
        kinds[spec.kind] = kinds.get(spec.kind, 0) + 1
    summary = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
    print(f"{len(plan.experiments)} experiments -> {len(plan.stages)} stages ({summary}); planned in {time.perf_counter() - started:.3f} s")
    cached = [spec for spec in plan.stages.values() if spec.kind == "teacher_outputs"]
    if cached:
        readers = sum("teacher_outputs" in spec.upstream for spec in plan.stages.values())
        size = sum(spec.settings["bytes"] for spec in cached)
        shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        print(f"teacher cache: {shown} in {len(cached)} "
              f"teacher_outputs stage(s), read by {readers} student(s) instead of running their teacher")
    return 0


def run_local(plan: Plan, root: Path, to_run: dict[str, str], max_parallel: int | None) -> bool:
    from pipeline.backends.local import LocalBackend
    from stages import StageJob

    export_repo_path()
    cpus = max(int(plan.stages[name].resources.get("cpus", 1)) for name in to_run)
    parallel = max_parallel or max(1, (os.cpu_count() or 1) // cpus)
    jobs_dir = root / "jobs" / plan.sweep_name
    print(
        f"running {len(to_run)} of {len(plan.stages)} stages of sweep {plan.sweep_name!r} locally, {parallel} at a time; "
        f"each job's stdout/stderr in {jobs_dir / 'local'}/<job id>/"
    )
    outcomes = LocalBackend(root, jobs_dir, StageJob(), parallel).run(plan, to_run)
    failed = [outcome for outcome in outcomes if outcome.state in ("failed", "cancelled", "blocked")]
    for outcome in failed:
        print(f"{outcome.state}: {outcome.name}: {outcome.error}", file=sys.stderr)
    return not failed


def preflight(plan: Plan, root: Path, names: list[str]) -> None:
    """Checks method settings against real tap shapes (imports torch) for stages not checked before."""
    verdicts = PreflightVerdicts(root)
    unchecked = verdicts.unchecked(plan, names)
    if not unchecked:
        return
    from pipeline.catalogue import load_catalogue
    from stages.preflight import check_plan

    check_plan(plan, load_catalogue(), unchecked)
    verdicts.accept(plan, unchecked)


def run_sweep(plan: Plan, root: Path, backend: str, max_parallel: int | None = None) -> bool | None:
    """Under the sweep's submit lock: what must run (torch-free), preflight, then the backend.

    Returns None when every stage was already DONE (nothing imported torch), else whether all went
    well (local) or the submission went out (cluster).
    """
    jobs_dir = root / "jobs" / plan.sweep_name
    with submit_lock(jobs_dir):
        to_run = stages_to_run(plan, root)
        if not to_run:
            print(f"nothing to do: all {len(plan.stages)} stages of sweep {plan.sweep_name!r} are DONE (verified)")
            return None
        preflight(plan, root, list(to_run))
        if backend == "local":
            return run_local(plan, root, to_run, max_parallel)
        submit_to_cluster(plan, root, backend, jobs_dir, to_run)
        return True


def export_repo_path() -> None:
    """Jobs unpickle ``stages.StageJob``: make the repository importable in them wherever they run."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def submit_to_cluster(plan: Plan, root: Path, backend: str, jobs_dir: Path, to_run: dict[str, str]) -> None:
    from pipeline.backends import cluster_scheduler
    from pipeline.backends.cluster import ClusterBackend
    from stages import StageJob

    export_repo_path()
    scheduler = cluster_scheduler(backend)
    started = time.perf_counter()
    summary = ClusterBackend(scheduler, root, jobs_dir, StageJob()).submit(plan, to_run)
    print(
        f"{backend}: submitted {len(summary.submitted)} stage(s) in {summary.arrays} array(s); "
        f"{len(summary.skipped_done)} already DONE, {len(summary.skipped_live)} still queued or running, "
        f"{len(summary.skipped_elsewhere)} queued or running for another sweep or runner; "
        f"{scheduler.calls} scheduler call(s) in {time.perf_counter() - started:.2f} s; manifest {jobs_dir / 'manifest.json'}"
    )


def command_submit(args: argparse.Namespace) -> int:
    plan = build_plan(Path(args.sweep))
    root = output_root(args)
    outcome = run_sweep(plan, root, args.backend, args.max_parallel)
    if outcome is None:
        return 0
    if args.backend == "local":
        return 0 if outcome else 1
    if args.wait:
        from pipeline.status import wait_for

        done = wait_for(plan, root)
        print(("all stages done" if done else "some stages did not finish; see runner.py status") + f": sweep {plan.sweep_name}")
        return 0 if done else 1
    return 0


def command_status(args: argparse.Namespace) -> int:
    from pipeline.status import current_status, format_status

    statuses = current_status(build_plan(Path(args.sweep)), output_root(args))
    print(format_status(statuses))
    return 0 if all(status.state == "done" for status in statuses) else 3


def command_cancel(args: argparse.Namespace) -> int:
    from pipeline.backends import cancel_jobs
    from pipeline.manifest import Manifest
    from pipeline.status import current_status

    plan = build_plan(Path(args.sweep))
    root = output_root(args)
    manifest = Manifest.load(root / "jobs" / plan.sweep_name)
    active = [
        status for status in current_status(plan, root)
        if status.state in ("queued", "running") and (args.stage is None or status.kind == args.stage)
    ]
    # Only this sweep's own jobs: a stage another sweep or user is running is theirs to cancel.
    chosen = [status for status in active if status.job_id and str(manifest.stages.get(status.name, {}).get("job_id", "")) == status.job_id]
    for status in active:
        if status not in chosen:
            print(f"not cancelled: {status.name} is run by another sweep or user ({status.detail})")
    by_backend: dict[str, list[str]] = {}
    for status in chosen:
        by_backend.setdefault(manifest.stages[status.name].get("backend", "local"), []).append(status.job_id)
    for backend, job_ids in by_backend.items():
        cancel_jobs(backend, job_ids)
    for status in chosen:
        manifest.record(status.name, state="cancelled")
    print(f"cancelled {len(chosen)} stage(s) of sweep {plan.sweep_name}" + "".join(f"\n  {status.name} ({status.job_id})" for status in chosen))
    return 0


def find_stage(identifier: str, root: Path, sweep: str | None) -> tuple[StageSpec, Path]:
    """A stage spec and its output root: from a logs folder's config.json (the root is the folder
    above its logs/), or by (unique prefix of) name from a sweep's plan under ``root``."""
    folder = Path(identifier)
    if (folder / "config.json").is_file():
        return StageSpec.from_dict(read_json(folder / "config.json")), folder.resolve().parent.parent
    if (root / "logs" / identifier / "config.json").is_file():
        return StageSpec.from_dict(read_json(root / "logs" / identifier / "config.json")), root
    if sweep is None:
        raise SystemExit(f"stage {identifier!r}: no logs/{identifier}/config.json under {root}; pass --sweep SWEEP to find it in a plan")
    stages = build_plan(Path(sweep)).stages
    matches = [spec for name, spec in stages.items() if name == identifier or name.startswith(identifier) or spec.hash.startswith(identifier)]
    if len(matches) != 1:
        found = ", ".join(spec.name for spec in matches[:5]) or "none"
        raise SystemExit(f"{sweep}: stage {identifier!r} matches {len(matches)} stages ({found}); give a longer name")
    return matches[0], root


def command_stage(args: argparse.Namespace) -> int:
    from stages import run_stage

    spec, root = find_stage(args.stage, output_root(args), args.sweep)
    outcome = run_stage(spec, root, force=args.force)
    if outcome == "elsewhere":
        print(f"not run: {spec.name} is already running elsewhere; its DONE will appear in {root / 'logs' / spec.name}")
        return 0
    print(f"{'already DONE' if outcome == 'skipped' else 'done'}: {root / 'logs' / spec.name}")
    return 0


def command_invalidate(args: argparse.Namespace) -> int:
    root = output_root(args)
    target = Path(args.target)
    if target.suffix in (".yaml", ".yml") and target.is_file():
        plan = build_plan(target)
        chosen = [spec for spec in plan.stages.values() if args.stage is None or spec.kind == args.stage]
    else:
        spec, root = find_stage(args.target, root, args.sweep)
        chosen = [spec]
    names = {spec.name for spec in chosen}
    if args.downstream:
        names |= downstream_stages(root, names)
    for name in sorted(names):
        holder = live_lease(StageFolders(root, name).logs)
        if holder is not None:
            raise SystemExit(f"error: {name} is running ({holder.describe()}); cancel it first: python runner.py cancel SWEEP")
    for name in sorted(names):
        StageFolders(root, name).discard_outputs()
    print(f"invalidated {len(names)} stage(s); the next submit (or runner.py stage) rebuilds them from scratch"
          + "".join(f"\n  {name}" for name in sorted(names)))
    return 0


def downstream_stages(root: Path, names: set[str]) -> set[str]:
    """Every stage under ``root/logs`` built, directly or not, from one of ``names``, whatever its sweep."""
    upstream_of = {}
    for config in (root / "logs").glob("*/config.json"):
        try:
            upstream_of[config.parent.name] = set(read_json(config)["upstream"].values())
        except (CorruptFileError, KeyError, TypeError):
            continue
    found: set[str] = set()
    frontier = set(names)
    while frontier:
        frontier = {name for name, ups in upstream_of.items() if ups & frontier and name not in found and name not in names}
        found |= frontier
    return found


def stage_folders(paths: list[str]) -> list[Path]:
    """The given folders (or log.pkl files) that belong to stages; others get a one-line note, not an abort."""
    chosen = []
    for given in paths:
        path = Path(given)
        folder = path.parent if path.is_file() else path
        if path.is_dir() and not ((folder / "log.pkl").exists() or (folder / "config.json").exists()):
            print(f"note: skipping {path}: not a stage folder (no config.json or log.pkl)", file=sys.stderr)
            continue
        chosen.append(path)
    return chosen


def command_logs(args: argparse.Namespace) -> int:
    from pipeline.logfiles import format_log, read_log

    for folder in stage_folders(args.folders):
        print(format_log(read_log(folder)))
        print()
    return 0


def command_plot(args: argparse.Namespace) -> int:
    from pipeline.logfiles import read_log
    from pipeline.plots import write_plots

    for folder in stage_folders(args.folders):
        log_folder = folder.parent if folder.is_file() else folder
        for written in write_plots(read_log(folder), log_folder):
            print(written)
    return 0


def command_report(args: argparse.Namespace) -> int:
    from pipeline.analysis_report import analysis_markdown, write_analysis_figures
    from pipeline.report import aggregate, plan_rows, to_markdown, write_report

    root = output_root(args)
    plan = build_plan(Path(args.sweep))
    table = aggregate(plan_rows(plan, root))
    out = Path(args.out) if args.out else root / "logs" / f"report-{plan.sweep_name}"
    analysis = analysis_markdown(plan, root)
    written = write_report(table, out, analysis)
    figures = write_analysis_figures(plan, root, out)
    print(to_markdown(table))
    if analysis:
        print(analysis)
    print("written: " + ", ".join(str(path) for path in written) + (f", and {len(figures)} analysis figures there" if figures else ""))
    return 0


def command_layers_quality(args: argparse.Namespace) -> int:
    """Each analysed teacher's taps ranked by quality Q, and its top k as a teacher_taps line."""
    from pipeline.analysis_report import GEOMETRY, GEOMETRY_HEADERS, ranked_layers, read_analysis, split_of, top_layers

    if args.top < 1:
        print(f"error: --top {args.top}: the line needs at least one tap; allowed: an int >= 1", file=sys.stderr)
        return 2
    root = output_root(args)
    plan = build_plan(Path(args.sweep))
    stages = [stage for stage in dict.fromkeys(experiment.teacher_analyze_stage for experiment in plan.experiments) if stage]
    if not stages:
        print(f"error: {args.sweep}: defaults.analysis: the sweep analyses no teacher; set geometry: true "
              "(and models: [teacher, ...]) and run it", file=sys.stderr)
        return 2
    shown = 0
    for stage in stages:
        numbers = read_analysis(root, stage)
        if numbers is None:
            print(f"{stage}: not done yet (python runner.py status {args.sweep})")
            continue
        if not ranked_layers(numbers):
            print(f"{stage}: no layer geometry (analysis.geometry was off)")
            continue
        shown += 1
        print(f"{numbers['arch']} teacher on {numbers['dataset']} ({stage}), taps by quality Q, {split_of(numbers)} split:")
        print(f"{'rank':>4}  {'tap':<16}" + "".join(f"{header:>9}" for header in GEOMETRY_HEADERS))
        for rank, (tap, geometry) in enumerate(ranked_layers(numbers), 1):
            cells = ("n/a" if geometry.get(key) is None else f"{geometry[key]:.3g}" for key in GEOMETRY)
            print(f"{rank:>4}  {tap:<16}" + "".join(f"{cell:>9}" for cell in cells))
        print(f"teacher_taps: [{', '.join(top_layers(numbers, args.top))}]")
        print(f"(the {args.top} best feature maps, in forward order, for feature_only; it pairs them in order with "
              "student_taps, which need as many)\n")
    return 0 if shown else 1


def command_layers(args: argparse.Namespace) -> int:
    """One line per generalised layer of ARCH: the index a sweep may give as a tap, the module, its
    per-sample output shape for the data set's images (on the meta device: no weights, no data)."""
    from pipeline.catalogue import load_catalogue

    catalogue = load_catalogue()
    for kind, name, known in (("architecture", args.arch, catalogue.architectures), ("data set", args.dataset, catalogue.datasets)):
        if name not in known:
            print(f"error: unknown {kind} {name!r}; allowed: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
    from models.registry import tap_shapes

    architecture, dataset = catalogue.architectures[args.arch], catalogue.datasets[args.dataset]
    shapes = tap_shapes(args.arch, dataset.image_shape, dataset.num_classes)
    image = "x".join(str(size) for size in dataset.image_shape)
    print(f"{args.arch}: {len(architecture.layers)} generalised layers, output per sample for {args.dataset} images ({image})")
    width = max(len(name) for name in architecture.layers)
    print(f"{'index':>5}  {'layer':<{width}}  {'shape':<16}  tap")
    for index, name in enumerate(architecture.layers):
        tap = "yes" if name in architecture.taps else ""
        print(f"{index:>5}  {name:<{width}}  {shapes[index]!s:<16}  {tap}".rstrip())
    return 0


def command_data(args: argparse.Namespace) -> int:
    """``data check``: the data set's folder as its reader sees it (layout, classes, images per split,
    every file decoded), in one screen, before a sweep that reads it is submitted."""
    from pipeline.catalogue import load_catalogue

    known = load_catalogue().datasets
    if args.dataset not in known:
        print(f"error: unknown data set {args.dataset!r}; allowed: {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    from data.check import check_data

    root = args.data_root or os.environ.get("KDBENCH_DATA")
    passed, text = check_data(args.dataset, os.path.abspath(os.path.expanduser(root)) if root else None)
    print(text)
    return 0 if passed else 1


def command_demo(args: argparse.Namespace) -> int:
    args.sweep, args.out = str(DEMO_SWEEP), None
    started = time.perf_counter()
    if run_sweep(build_plan(DEMO_SWEEP), output_root(args), "local", args.max_parallel) is False:
        return 1
    print(f"demo sweep finished in {time.perf_counter() - started:.0f} s\n")
    return command_report(args)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="runner.py", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str, example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=f"{help_text}\n\nexample: {example}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    def with_root(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--root", help="folder holding logs/, weights/, jobs/ (default: $KDBENCH_ROOT or the repository)")

    sub = command("plan", command_plan, "validate a sweep file and print its stage graph", "python runner.py plan configs/demo.yaml")
    sub.add_argument("sweep", help="sweep YAML file")

    sub = command("submit", command_submit, "run a sweep's stages in dependency order (DONE stages are skipped)",
                  "python runner.py submit configs/demo.yaml --backend local")
    sub.add_argument("sweep", help="sweep YAML file")
    sub.add_argument("--backend", choices=["local", "slurm", "pbs"], default="local", help="where stages run (default: local)")
    sub.add_argument("--max-parallel", type=int, help="local backend: stages at once (default: cores / cpus per stage)")
    sub.add_argument("--wait", action="store_true", help="slurm/pbs: wait until no stage is queued or running")
    with_root(sub)

    sub = command("status", command_status, "table of stages: done, running, queued, failed (stderr tail), blocked by which upstream",
                  "python runner.py status configs/demo.yaml")
    sub.add_argument("sweep", help="sweep YAML file")
    with_root(sub)

    sub = command("cancel", command_cancel, "cancel a sweep's queued and running stages", "python runner.py cancel configs/demo.yaml --stage train_student")
    sub.add_argument("sweep", help="sweep YAML file")
    sub.add_argument("--stage", choices=STAGE_KINDS, help="only stages of this kind")
    with_root(sub)

    sub = command("stage", command_stage, "run one stage in this process (for debugging); resumes from its checkpoint",
                  "python runner.py stage logs/train_teacher-digits-resnet32x4-1a2b3c4d")
    sub.add_argument("stage", help="stage folder (logs/NAME), stage name, or name/hash prefix with --sweep")
    sub.add_argument("--sweep", help="sweep YAML to find the stage in, when it has not run before")
    sub.add_argument("--force", action="store_true", help="rebuild from scratch: discard its DONE, checkpoint and outputs first")
    with_root(sub)

    sub = command("invalidate", command_invalidate,
                  "discard stages' DONE, checkpoints and outputs so the next submit rebuilds them from scratch",
                  "python runner.py invalidate logs/train_teacher-digits-resnet20-1a2b3c4d --downstream")
    sub.add_argument("target", help="stage folder (logs/NAME), stage name with --sweep, or a sweep YAML (all its stages)")
    sub.add_argument("--sweep", help="sweep YAML to find a stage name in")
    sub.add_argument("--stage", choices=STAGE_KINDS, help="with a sweep: only stages of this kind")
    sub.add_argument("--downstream", action="store_true", help="also every stage under the root built from them, in any sweep")
    with_root(sub)

    sub = command("logs", command_logs, "print pickled stage logs as per-epoch tables and a summary", "python runner.py logs logs/train_student-*")
    sub.add_argument("folders", nargs="+", help="stage folders in logs/ (or log.pkl files)")

    sub = command("plot", command_plot, "regenerate Loss.png / Accuracy.png from log.pkl alone", "python runner.py plot logs/train_teacher-*")
    sub.add_argument("folders", nargs="+", help="stage folders in logs/ (or log.pkl files)")

    sub = command("report", command_report, "mean ± std over seeds per dataset, pair and method (Markdown, CSV, bar chart)",
                  "python runner.py report configs/demo.yaml")
    sub.add_argument("sweep", help="sweep YAML file")
    sub.add_argument("--out", help="folder for report.md/.csv/.png (default: logs/report-<sweep name>)")
    with_root(sub)

    sub = command("layers-quality", command_layers_quality,
                  "rank each analysed teacher's taps by layer quality Q and print the top k as a teacher_taps line",
                  "python runner.py layers-quality my_sweep.yaml --top 3")
    sub.add_argument("sweep", help="sweep YAML file with analysis.geometry on")
    sub.add_argument("--top", type=int, default=3, help="how many taps the teacher_taps line gets (default 3)")
    with_root(sub)

    sub = command("layers", command_layers,
                  "list an architecture's generalised layers (tap indices) with their output shapes",
                  "python runner.py layers resnet8x4 --dataset digits")
    sub.add_argument("arch", help="architecture name, e.g. resnet20")
    sub.add_argument("--dataset", default="cifar100", help="data set whose image shape the shapes are for (default: cifar100, 3x32x32)")

    sub = command("data", command_data, "check a data set's folder before submitting: layout, classes, image counts, unreadable files",
                  "python runner.py data check tinyimagenet --data-root /datasets")
    sub.add_argument("action", choices=["check"], help="what to do with the data set")
    sub.add_argument("dataset", help="data set name, e.g. tinyimagenet")
    sub.add_argument("--data-root", help="folder holding the data set (default: $KDBENCH_DATA)")

    sub = command("demo", command_demo, "run the bundled demo sweep (configs/demo.yaml) and print its report", "python runner.py demo")
    sub.add_argument("--max-parallel", type=int, help="stages at once (default: cores / cpus per stage)")
    with_root(sub)
    return top


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose one-line message is all a user needs. StageError and ReportError are only
    looked up once their modules (torch, matplotlib) are loaded, so other commands stay light."""
    errors: list[type[Exception]] = [
        SweepError, CatalogueError, SubmitLockedError, CorruptFileError, LogError, DatasetError, BackendError,
        LeaseLostError,
    ]
    if "stages.files" in sys.modules:
        errors.append(sys.modules["stages.files"].StageError)
    if "pipeline.report" in sys.modules:  # loads matplotlib: only looked up once loaded
        errors.append(sys.modules["pipeline.report"].ReportError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

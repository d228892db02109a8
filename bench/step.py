"""Images per second of one training step of each distillation method, resnet32x4 -> resnet8x4.

A step is what stages/train_student.py runs per batch: the frozen teacher's no-grad forward with its
taps, the student's forward with its taps, the method's loss terms, backward and an SGD step. A
method that reads the teacher cannot avoid two of those costs, a teacher forward and a student
train step, so the number to watch is method-step / (student step + teacher forward): anything
above 1 is the method's own cost (hooks, extra modules, loss terms, the loop's per-term syncs).
Every method of the catalogue is timed, and the compositions the papers report; the goals are 1.05 for logit methods (no taps), 1.30 for
feature methods and 1.40 for CRD, on CPU.
Repeats are interleaved across cases so a load spike on a shared machine hits all of them alike.
Run: .venv/bin/python bench/step.py [--device cuda --amp]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from distill.base import MethodContext, method_class  # noqa: E402
from distill.composition import build_method, method_parts  # noqa: E402
from models.registry import build_model, tap_shapes  # noqa: E402
from pipeline.catalogue import load_catalogue  # noqa: E402
from pipeline.plan import method_settings as student_method_settings  # noqa: E402
from stages.context import select_device  # noqa: E402
from stages.train_student import distillation_terms  # noqa: E402

TEACHER, STUDENT, NUM_CLASSES, IMAGE_SHAPE = "resnet32x4", "resnet8x4", 100, (3, 32, 32)
CIFAR100_TRAIN_SIZE = 50_000
COMPOSITIONS = ("crd+kd", "at+kd", "kd+supcon")
CATALOGUE = load_catalogue()
METHODS = ("vanilla", *sorted(name for name in CATALOGUE.methods if name != "vanilla"), *COMPOSITIONS)
REQUIRED = {"ft": {"paraphraser_epochs": 1}}  # params with no default; FT's only matters to its pre-stage
GOALS = {"logit": 1.05, "feature": 1.30, "crd": 1.40}


def goal(name: str, context: MethodContext) -> float:
    """The overhead goal of ``name``: CRD's own (for a composition, its most lenient part's), else by
    whether the method reads feature taps."""
    parts = [part["name"] for part in method_parts(method_settings(name))]
    if any(part in GOALS for part in parts):
        return max(GOALS.get(part, 0.0) for part in parts)
    method = build_method(method_settings(name), context)
    return GOALS["feature"] if method.teacher_taps or method.student_taps else GOALS["logit"]


def method_params(name: str) -> dict:
    declared = method_class(name).METHOD["params"]
    return {key: spec["default"] for key, spec in declared.items() if "default" in spec} | REQUIRED.get(name, {})


def method_settings(value: str) -> dict:
    """The settings the plan gives a student of ``value`` with every default: one method or a composition."""
    names = value.split("+")
    return student_method_settings(value, [CATALOGUE.methods[name] for name in names], {name: method_params(name) for name in names})


def uses_teacher(value: str) -> bool:
    return any(method_class(part["name"]).METHOD["uses_teacher"] for part in method_parts(method_settings(value)))


def train_step(name: str, teacher: nn.Module, context: MethodContext, images: torch.Tensor, labels: torch.Tensor,
               indices: torch.Tensor, device: torch.device, amp: bool) -> Callable[[], None]:
    """One step of ``name`` as train_student's terms and EpochLoop's step run it, on a fresh student."""
    torch.manual_seed(0)
    student = build_model(STUDENT, NUM_CLASSES, IMAGE_SHAPE).to(device).train()
    method = build_method(method_settings(name), context).to(device).train()
    compute_terms = distillation_terms(student, teacher if uses_teacher(name) else None, method)
    parameters = [p for p in [*student.parameters(), *method.parameters()] if p.requires_grad]
    # A small lr: the step costs the same, and repeated steps on one random batch with an untrained
    # teacher must not diverge (a NaN would stop the run)
    optimizer = torch.optim.SGD(parameters, lr=1e-4, momentum=0.9, weight_decay=5e-4)
    logged: dict[str, float] = {}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            terms, _ = compute_terms(images, labels, 0, indices, torch.Generator().manual_seed(0))
        total = sum(terms.values())
        for term, value in terms.items():  # the loop checks and logs every term: two syncs each
            if not torch.isfinite(value):
                raise RuntimeError(f"{name}: loss term {term!r} is {value.item()}")
            logged[term] = value.item()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return step


def teacher_forward(teacher: nn.Module, images: torch.Tensor, device: torch.device, amp: bool) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            teacher(images)

    return forward


def seconds_per_call(run: Callable[[], None], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, help="timed steps per repeat (default: 20 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps per case first (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="the median over repeats is reported")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only, as in training)")
    args = parser.parse_args()
    device = select_device(args.device)
    on_cuda = device.type == "cuda"  # a CPU step of all five cases takes ~20 s on 2 cores: keep CPU runs short
    args.steps = args.steps or (20 if on_cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    amp = args.amp and on_cuda

    generator = torch.Generator().manual_seed(0)
    images = torch.randn((args.batch_size, *IMAGE_SHAPE), generator=generator).to(device)
    labels = torch.randint(NUM_CLASSES, (args.batch_size,), generator=generator).to(device)
    indices = torch.arange(args.batch_size, device=device)
    torch.manual_seed(0)
    teacher = build_model(TEACHER, NUM_CLASSES, IMAGE_SHAPE).to(device).requires_grad_(False).eval()
    context = MethodContext(
        num_classes=NUM_CLASSES,
        teacher_tap_shapes=tap_shapes(TEACHER, IMAGE_SHAPE, NUM_CLASSES),
        student_tap_shapes=tap_shapes(STUDENT, IMAGE_SHAPE, NUM_CLASSES),
        pre_stage_dir=None,  # FT then keeps a random frozen paraphraser: same cost as a trained one
        train_size=CIFAR100_TRAIN_SIZE,  # CRD's memory banks and 16,384 negatives at the size they train at
        teacher=teacher,  # simkd reuses its classifier
        train_labels=torch.arange(CIFAR100_TRAIN_SIZE) % NUM_CLASSES,  # CRD draws negatives from other classes
    )
    cases = {"teacher forward": teacher_forward(teacher, images, device, amp)}
    cases |= {name: train_step(name, teacher, context, images, labels, indices, device, amp) for name in METHODS}

    gpu = f" ({torch.cuda.get_device_name(device)})" if on_cuda else ""
    print(f"torch {torch.__version__}, device {device}{gpu}, threads {torch.get_num_threads()}, "
          f"amp {'bf16' if amp else 'off'}, batch {args.batch_size}, {TEACHER} -> {STUDENT}, "
          f"median of {args.repeats} x {args.steps} steps after {args.warmup} warmup")
    for run in cases.values():
        for _ in range(args.warmup):
            run()
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            timings[name].append(seconds_per_call(run, args.steps, device))
    median = {name: statistics.median(values) for name, values in timings.items()}

    floor = median["vanilla"] + median["teacher forward"]
    print(f"  {'case':24s} {'ms':>9s}  {'images/s':>9s}  {'/ (student + teacher)':>22s}  goal    spread")
    for name in ("vanilla", "teacher forward", *METHODS[1:]):
        label = "student step (vanilla)" if name == "vanilla" else name if name == "teacher forward" else f"{name} step"
        spread = (max(timings[name]) - min(timings[name])) / median[name]
        line = f"  {label:24s} {median[name] * 1e3:9.1f}  {args.batch_size / median[name]:9.1f}"
        if name in METHODS[1:] and uses_teacher(name):
            ratio, target = median[name] / floor, goal(name, context)
            line += f"  {ratio:22.3f}  {target:.2f} {'met' if ratio <= target else 'NOT met':7s}"
        else:
            line += " " * 40
        print(f"{line}  {spread:4.0%}")


if __name__ == "__main__":
    main()

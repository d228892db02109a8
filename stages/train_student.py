"""Stage 3: train a student with one distillation method from ``distill/``.

The stage knows no method by name: it asks the method which feature taps it reads, runs the
frozen teacher (no grad) and the student with those taps, and trains the student together with
whatever modules the method adds (translator, projection), logging each loss term separately.
With a ``teacher_outputs`` upstream (``teacher_cache``) the teacher does not run: its logits of
each batch are read from that stage's file.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.base import Batch, Method, MethodConfigError, MethodContext, ModelOutput
from distill.composition import build_method
from models.registry import tap_shapes
from models.taps import FeatureTaps, tap_module_name
from stages.context import StageRun
from stages.files import StageError
from stages.loading import (
    load_classifier,
    load_stage_data,
    method_context_record,
    model_state,
    new_classifier,
)
from stages.teacher_outputs import TeacherOutputs, cached_teacher_arch
from stages.training import ComputeTerms, EpochLoop, TrainingSettings, backbone_lr_scales, training_outputs


def distillation_terms(
    student: nn.Module, teacher: nn.Module | None, method: Method, cached: TeacherOutputs | None = None,
) -> ComputeTerms:
    """One batch's loss terms: the method's batch (mixed, for mixup) through the frozen teacher (no
    grad) and the student, each with the method's taps; with ``cached``, the teacher's logits of
    the batch come from its ``teacher_outputs`` file instead."""
    student_taps = FeatureTaps(student, method.student_taps)
    teacher_taps = FeatureTaps(teacher, method.teacher_taps) if teacher is not None else None
    if method.detached_student_tap is not None:
        detach_output_of(student, method.detached_student_tap)

    def compute_terms(
        images: torch.Tensor, labels: torch.Tensor, epoch: int, indices: torch.Tensor, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = method.prepare_batch(Batch(images, labels, epoch, indices, generator))
        teacher_output = None
        if cached is not None:
            if batch.images is not images:
                raise StageError("the method changes the batch's images (prepare_batch), which the cached teacher "
                                 "logits never saw; plan it without teacher_cache")
            teacher_output = ModelOutput(*cached.outputs(epoch, indices, images.device))
        elif teacher_taps is not None:
            with torch.no_grad():
                teacher_output = ModelOutput(*teacher_taps(batch.images))
        student_output = ModelOutput(*student_taps(batch.images))
        return method.loss(student_output, teacher_output, batch), method.student_logits(student_output)

    return compute_terms


def detach_output_of(model: nn.Module, tap: str | int) -> None:
    """Make the module of ``tap`` (a name or a generalised layer index) hand the rest of ``model`` a
    detached output. Its forward hook runs after the FeatureTaps hooks registered before it, so the
    method still reads the attached tensor."""
    module = model.get_submodule(tap_module_name(model, tap))
    module.register_forward_hook(lambda module, inputs, output: output.detach())


def run(stage: StageRun) -> None:
    spec, device, upstream = stage.spec, stage.device, stage.upstream
    training = spec.settings["training"]
    settings = TrainingSettings.from_settings(training, seed=training["seed"])
    data = load_stage_data(spec, stage.upstream, stage.device)
    arch = spec.settings["arch"]

    torch.manual_seed(settings.seed)
    student, imported = new_classifier(arch, data, training.get("init"))
    student = stage.prepare(student, "student")
    cached = None
    if "teacher_outputs" in upstream:  # the teacher's logits are on file: its network is not needed
        outputs = upstream["teacher_outputs"]
        cached, teacher, teacher_arch = TeacherOutputs(outputs, data.num_classes), None, cached_teacher_arch(outputs.config)
    elif "teacher" in upstream:
        trained_teacher = load_classifier(upstream["teacher"].final_weights, device)
        teacher, teacher_arch = stage.prepare(trained_teacher.model, "teacher"), trained_teacher.arch
    else:
        teacher = teacher_arch = None
    image_shape = tuple(data.image_shape)
    context = MethodContext(
        num_classes=data.num_classes,
        teacher_tap_shapes=tap_shapes(teacher_arch, image_shape, data.num_classes) if teacher_arch else {},
        student_tap_shapes=tap_shapes(arch, image_shape, data.num_classes),
        pre_stage_dir=str(upstream["paraphraser"].weights) if "paraphraser" in upstream else None,
        train_size=len(data.train_labels),
        teacher=teacher,
        train_labels=data.train_labels,
    )
    try:
        method = stage.prepare(build_method(spec.settings["method"], context), "method", call="loss")
    except MethodConfigError as error:
        raise StageError(f"{spec.name}: methods.{error.key}: {error}") from None
    deployed = method.deployed(student)
    method_record = {"settings": spec.settings["method"], "context": method_context_record(context)}
    log = EpochLoop(
        stage=stage,
        record={**stage.record(settings.seed), "initial_weights": imported},
        modules=nn.ModuleDict({"model": student, "method": method}),
        compute_terms=distillation_terms(student, teacher, method, cached),
        data=data,
        settings=settings,
        classifier=deployed,
        saved_state=lambda: model_state(arch, data, student, method, method_record),
        lr_scales=backbone_lr_scales("model", training.get("backbone_lr_scale", 1.0)),
    ).run()
    stage.finish(log, training_outputs(stage.folders), plots=True)

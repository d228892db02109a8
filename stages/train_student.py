"""Stage 3: train a student with one distillation method from ``distill/``.

The stage knows no method by name: it asks the method which feature taps it reads, runs the
frozen teacher (no grad) and the student with those taps, and trains the student together with
whatever modules the method adds (translator, projection), logging each loss term separately.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.base import Batch, Method, MethodConfigError, MethodContext, ModelOutput, method_class
from models.registry import tap_shapes
from models.taps import FeatureTaps
from stages.context import StageRun
from stages.files import StageError
from stages.loading import load_classifier, load_stage_data, model_state, new_classifier
from stages.training import ComputeTerms, EpochLoop, TrainingSettings, training_outputs


def distillation_terms(student: nn.Module, teacher: nn.Module | None, method: Method) -> ComputeTerms:
    """One batch's loss terms: the frozen teacher (no grad) and the student, each with the method's taps."""
    student_taps = FeatureTaps(student, method.student_taps)
    teacher_taps = FeatureTaps(teacher, method.teacher_taps) if teacher is not None else None

    def compute_terms(
        images: torch.Tensor, labels: torch.Tensor, epoch: int, indices: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        teacher_output = None
        if teacher_taps is not None:
            with torch.no_grad():
                teacher_output = ModelOutput(*teacher_taps(images))
        logits, features = student_taps(images)
        return method.loss(ModelOutput(logits, features), teacher_output, Batch(images, labels, epoch, indices)), logits

    return compute_terms


def run(stage: StageRun) -> None:
    spec, device, upstream = stage.spec, stage.device, stage.upstream
    training = spec.settings["training"]
    settings = TrainingSettings.from_settings(training, seed=training["seed"])
    data = load_stage_data(spec)
    arch, method_name = spec.settings["arch"], spec.settings["method"]["name"]
    params = spec.settings["method"]["params"]

    torch.manual_seed(settings.seed)
    student = new_classifier(arch, data).to(device)
    trained_teacher = load_classifier(upstream["teacher"].final_weights, device) if "teacher" in upstream else None
    teacher = trained_teacher.model if trained_teacher else None
    image_shape = tuple(data.image_shape)
    context = MethodContext(
        num_classes=data.num_classes,
        teacher_tap_shapes=tap_shapes(trained_teacher.arch, image_shape, data.num_classes) if trained_teacher else {},
        student_tap_shapes=tap_shapes(arch, image_shape, data.num_classes),
        pre_stage_dir=str(upstream["paraphraser"].weights) if "paraphraser" in upstream else None,
        train_size=len(data.train_labels),
    )
    method_type = method_class(method_name)
    try:
        method_type.check(params, context)
    except MethodConfigError as error:
        raise StageError(f"{spec.name}: methods.{method_name}.{error.key}: {error}") from None
    method = method_type(params, context).to(device)
    log = EpochLoop(
        stage=stage,
        record=stage.record(settings.seed),
        modules=nn.ModuleDict({"model": student, "method": method}),
        compute_terms=distillation_terms(student, teacher, method),
        data=data,
        settings=settings,
        classifier=student,
        saved_state=lambda: model_state(arch, data, student, method),
    ).run()
    stage.finish(log, training_outputs(stage.folders), plots=True)

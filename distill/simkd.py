"""SimKD: knowledge distillation with the reused teacher classifier (Chen et al., "Knowledge
Distillation with the Reused Teacher Classifier", CVPR 2022).

A learned projector lifts the student's last feature map to the teacher's; the student is trained
to make that projection match the teacher's last map, and it then predicts through the teacher's
own classifier: ``average pool -> teacher head`` on the projected map. The deployed network
(validation, evaluation, the parameter count) is therefore student + projector + head.

Follows the authors' released code (DefangChen/SimKD): ``models/util.py`` ``SimKD`` (the
projector and the spatial alignment), ``train_student.py`` (``--distill simkd``, ``-f 2``: the
maps ``feat[-2]``, i.e. the last stage's output before pooling, here the taps ``layer3``; the
projector and nothing of the teacher in the trainable list), ``helper/loops.py`` (``nn.MSELoss()``,
the mean over batch and every entry; the accuracy read from the head's prediction) and
``scripts/run_distill.sh`` (``-c 0 -d 0 -b 1``: the feature term alone, weight 1):

* projector (bottleneck, ``factor`` 2, convolutions without bias): 1x1 conv C_S -> C_T/f, BN, ReLU,
  3x3 conv C_T/f -> C_T/f, BN, ReLU, 1x1 conv C_T/f -> C_T, BN, ReLU;
* spatial alignment: the larger of the two maps is average-pooled (adaptively) to the other's
  height and width before the projector (student) or the loss (teacher); the code pools to a
  square (H, H), this pools each side to the smaller height and the smaller width.

One departure: ``ce_weight`` (default 0, the released ``-c 0``) weighs the cross-entropy of the
head's prediction, not of the student's own classifier as the released loop's ``-c`` does: the
student's classifier is not deployed, and this is the term that fine-tunes the head when
``learn_teacher_classifier`` is true (without it nothing would train the head, so that setting
needs ``ce_weight > 0``). With ``learn_teacher_classifier`` false (the paper's) the head is a frozen
copy of the teacher's: no gradient, not in the optimiser, unchanged by training.
"""
from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distill._feature_maps import map_shape, tap_shape
from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, TapPairMethod, register_method
from models.taps import FeatureTaps, tap_module_name

METHOD = {
    "name": "simkd",
    "summary": "MSE between a projected student map and the teacher's last map; predicts through the reused teacher classifier (Chen et al. 2022)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "layer3", "tap": "teacher", "help": "teacher (C, H, W) map whose average pool the teacher head reads"},
        "student_tap": {"default": "layer3", "tap": "student", "help": "student (C, H, W) map the projector lifts to the teacher's"},
        "teacher_head": {"default": "fc", "tap": "teacher", "help": "the teacher's classifier (an nn.Linear), reused as the student's head"},
        "factor": {"default": 2, "min": 1, "help": "projector bottleneck: its middle convolutions have teacher channels // factor (SimKD's -f)"},
        "weight": {"default": 1.0, "min": 0.0, "help": "simkd term = weight x mean squared error between projected student map and teacher map (-b)"},
        "ce_weight": {"default": 0.0, "min": 0.0, "help": "weight of the cross-entropy of the head's prediction on labels (SimKD trains with 0)"},
        "learn_teacher_classifier": {"default": False, "help": "false: the reused teacher head stays frozen; true: it is fine-tuned (needs ce_weight > 0)"},
    },
    "pre_stage": None,
}


def projector(student_channels: int, teacher_channels: int, factor: int) -> nn.Sequential:
    """SimKD's bottleneck: 1x1, 3x3, 1x1 convolutions without bias, each followed by BN and ReLU."""
    middle = teacher_channels // factor
    return nn.Sequential(
        nn.Conv2d(student_channels, middle, kernel_size=1, bias=False), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, middle, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, teacher_channels, kernel_size=1, bias=False), nn.BatchNorm2d(teacher_channels), nn.ReLU(),
    )


def pooled_to(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``features`` average-pooled to ``size`` (H, W) where it is larger; as it is otherwise."""
    return features if tuple(features.shape[2:]) == size else F.adaptive_avg_pool2d(features, size)


class ProjectedClassifier(nn.Module):
    """The student's new top: align the student map's size, project it, pool it, apply the teacher head."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int], classes: int, factor: int):
        super().__init__()
        self.size = (min(student_shape[1], teacher_shape[1]), min(student_shape[2], teacher_shape[2]))
        self.projector = projector(student_shape[0], teacher_shape[0], factor)
        self.head = nn.Linear(teacher_shape[0], classes)

    def project(self, student_map: torch.Tensor) -> torch.Tensor:
        return self.projector(pooled_to(student_map, self.size))

    def classify(self, projected: torch.Tensor) -> torch.Tensor:
        return self.head(projected.mean(dim=(2, 3)))


class DeployedStudent(nn.Module):
    """student up to its tap -> projector -> average pool -> teacher head: the network simkd deploys.
    The student's own pool and classifier still run (its forward is not cut) but their output is unused."""

    def __init__(self, student: nn.Module, tap: str | int, top: ProjectedClassifier):
        super().__init__()
        self.student = student
        self.top = top
        self._taps = FeatureTaps(student, [tap])
        self._tap = tap

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, features = self._taps(images)
        return self.top.classify(self.top.project(features[self._tap]))


@register_method
class SimKD(TapPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        teacher_shape = map_shape(context, "teacher", self.params["teacher_tap"], "teacher_tap")
        self.top = ProjectedClassifier(
            map_shape(context, "student", self.params["student_tap"], "student_tap"), teacher_shape,
            context.num_classes, self.params["factor"],
        )
        if context.teacher is not None:
            self.top.head.load_state_dict(_teacher_head(context.teacher, self.params["teacher_head"]).state_dict())
        self.top.head.requires_grad_(bool(self.params["learn_teacher_classifier"]))
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both taps are maps, the bottleneck keeps a channel, the head is a Linear reading the teacher
        map's channels and predicting this data set's classes, and a learned head has a term to learn from."""
        channels = map_shape(context, "teacher", params["teacher_tap"], "teacher_tap")[0]
        map_shape(context, "student", params["student_tap"], "student_tap")
        if channels // params["factor"] < 1:
            raise MethodConfigError(
                "factor", f"factor {params['factor']} leaves no channel of the teacher map's {channels}; allowed: 1..{channels}"
            )
        head = tap_shape(context, "teacher", params["teacher_head"], "teacher_head")
        if len(head) != 1:
            raise MethodConfigError(
                "teacher_head",
                f"the teacher tap {params['teacher_head']!r} has shape {head}; simkd reuses a classifier, whose output is (classes,)",
            )
        inputs, classes = channels, head[0]
        if context.teacher is not None:
            module = _teacher_head(context.teacher, params["teacher_head"])
            if not isinstance(module, nn.Linear):
                raise MethodConfigError(
                    "teacher_head",
                    f"the teacher's {params['teacher_head']!r} is a {type(module).__name__}; simkd reuses an nn.Linear classifier",
                )
            inputs, classes = module.in_features, module.out_features
        if inputs != channels:
            raise MethodConfigError(
                "teacher_tap",
                f"the teacher's classifier reads {inputs} features, not the {channels} channels of the teacher tap "
                f"{params['teacher_tap']!r}; name the map its classifier pools (layer3 for the CIFAR ResNets)",
            )
        if classes != context.num_classes:
            raise MethodConfigError(
                "teacher_head",
                f"the teacher's classifier predicts {classes} classes but this data set has {context.num_classes}; "
                "simkd reuses it, so teacher and student must be trained on the same classes",
            )
        if params["learn_teacher_classifier"] and params["ce_weight"] <= 0:
            raise MethodConfigError(
                "learn_teacher_classifier",
                "learn_teacher_classifier true fine-tunes the head on the cross-entropy of its prediction; set ce_weight > 0",
            )

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        student_map = student.features[self.params["student_tap"]]
        projected = self.top.project(student_map)
        target = pooled_to(teacher.features[self.params["teacher_tap"]].detach(), tuple(projected.shape[2:]))
        logits = self.top.classify(projected)
        # Kept for student_logits in the same step, so the projector (and its BN statistics) runs once.
        self._last = (weakref.ref(student_map), logits.detach())
        return {
            "ce": self.cross_entropy(ModelOutput(logits, student.features), batch),
            "simkd": self.params["weight"] * F.mse_loss(projected, target),
        }

    def student_logits(self, student: ModelOutput) -> torch.Tensor:
        """The head's prediction on the projected map: what the deployed student predicts."""
        student_map = student.features[self.params["student_tap"]]
        if self._last is not None and self._last[0]() is student_map:
            return self._last[1]
        with torch.no_grad():
            return self.top.classify(self.top.project(student_map))

    def deployed(self, student: nn.Module) -> nn.Module:
        return DeployedStudent(student, self.params["student_tap"], self.top)


def _teacher_head(teacher: nn.Module, tap: str | int) -> nn.Module:
    return dict(teacher.named_modules())[tap_module_name(teacher, tap)]

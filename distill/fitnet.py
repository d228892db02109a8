"""FitNets: hints for thin deep nets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

A learned regressor maps the student's guided layer onto the teacher's hint layer, and the student
is trained to make that regression match: ``weight x MSE(regressor(F_S), F_T)`` (mean over batch
and every entry) plus ``ce_weight x CE``.

Follows RepDistiller's released code (HobbitLong/RepDistiller): ``distiller_zoo/FitNet.py`` (the
loss is ``nn.MSELoss()``, mean), ``models/util.py`` ``ConvReg`` (the regressor) and
``train_student.py`` (``--distill hint``: ``-r 1 -b 100``, ``--hint_layer 2``, here the taps
``layer2`` on both sides). As there, training is one stage: the hint term is added to the
cross-entropy from the first epoch, and the regressor is trained with the student. The paper
instead pretrains the student's lower half on the hint alone and then runs KD; that two-stage
schedule is not done here.

ConvReg picks its convolution from the two maps' heights, as RepDistiller's does: a student map
twice the teacher's is halved by a 3x3 stride-2 convolution, one half the teacher's is doubled by
a 4x4 stride-2 transposed convolution, and one at least as large is shrunk by a
(1 + H_S - H_T) x (1 + W_S - W_T) convolution (1x1 when sizes match); then batch norm and ReLU.
A student map smaller than the teacher's but not half of it fits none of these and is refused.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distill._feature_maps import feature_map_shape
from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, TapPairMethod, register_method

METHOD = {
    "name": "fitnet",
    "summary": "MSE between a learned regression (conv + BN + ReLU) of a student layer and a teacher hint layer (Romero et al. 2015)",
    "uses_teacher": True,
    "teacher_outputs_only": True,
    "per_sample_loss": True,
    "params": {
        "teacher_tap": {"default": "layer2", "tap": "teacher", "help": "teacher hint layer (a (C, H, W) feature map)"},
        "student_tap": {"default": "layer2", "tap": "student", "help": "student guided layer (a (C, H, W) feature map)"},
        "weight": {"default": 100.0, "min": 0.0, "help": "hint term = weight x mean squared error between regressor(student map) and teacher map"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}


def hint_convolution(student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]) -> nn.Module | None:
    """The convolution RepDistiller's ConvReg uses to map a (C, H, W) student map onto the teacher's
    (C, H, W), or None where none of its cases fits."""
    (s_channels, s_height, s_width), (t_channels, t_height, t_width) = student_shape, teacher_shape
    if s_height == 2 * t_height and s_width == 2 * t_width:
        return nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    if 2 * s_height == t_height and 2 * s_width == t_width:
        return nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    if s_height >= t_height and s_width >= t_width:
        return nn.Conv2d(s_channels, t_channels, kernel_size=(1 + s_height - t_height, 1 + s_width - t_width))
    return None


class HintRegressor(nn.Module):
    """RepDistiller's ConvReg: the shape-matching convolution, then batch norm and ReLU."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]):
        super().__init__()
        conv = hint_convolution(student_shape, teacher_shape)
        if conv is None:
            raise ValueError(f"no hint regressor maps a student map {student_shape} onto a teacher map {teacher_shape}")
        self.conv = conv
        self.bn = nn.BatchNorm2d(teacher_shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(features)))


@register_method
class FitNet(TapPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        self.regressor = HintRegressor(
            feature_map_shape(context, self.params, "student_tap"), feature_map_shape(context, self.params, "teacher_tap")
        )

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both taps are (C, H, W) maps, and the student's is one ConvReg can map onto the teacher's."""
        teacher_shape = feature_map_shape(context, params, "teacher_tap")
        student_shape = feature_map_shape(context, params, "student_tap")
        if hint_convolution(student_shape, teacher_shape) is None:
            raise MethodConfigError(
                "student_tap",
                f"the student tap {params['student_tap']!r} of (C, H, W) = {student_shape} cannot be regressed onto the "
                f"teacher tap {params['teacher_tap']!r} of {teacher_shape}; its H and W must be at least the teacher's "
                f"or exactly half of them",
            )

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        regressed = self.regressor(student.features[self.params["student_tap"]])
        hint = F.mse_loss(regressed, teacher.features[self.params["teacher_tap"]].detach())
        return {
            "ce": self.cross_entropy(student, batch),
            "fitnet": self.params["weight"] * hint,
        }

"""Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information
Distillation for Knowledge Transfer", CVPR 2019).

The student maximises a variational lower bound on the mutual information between its feature
maps and the teacher's: for each listed layer pair, a regressor predicts the teacher's map as a
Gaussian whose mean is a small network of the student's map and whose variance is learned per
channel. The term is the Gaussian negative log-likelihood without its constant,
``mean of 0.5 x (log var + (mean - t)^2 / var)`` over batch, channels and positions, summed over the
pairs and multiplied by ``weight``; plus ``ce_weight x CE``.

Follows RepDistiller's released code (HobbitLong/RepDistiller): ``distiller_zoo/VID.py`` (VIDLoss:
1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv, no biases; variance softplus(log_scale) + eps
with log_scale set so that it starts at init_pred_var = 5.0, eps = 1e-5; the larger map of a pair
average-pooled to the smaller's size; loss the mean of ``neg_log_prob``) and ``train_student.py``
(``--distill vid``: ``VIDLoss(s, t, t)``, i.e. the middle width is the teacher's channel count;
the pairs are every block group's output, here ``layer1``-``layer3``; ``-r 1 -b 1``, one stage,
the regressors trained with the student). One departure: RepDistiller pools to a square of the
target's height; here to the target's height and width, the same for the square maps it meets.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distill._feature_maps import map_pairs
from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, TapListPairMethod, register_method

METHOD = {
    "name": "vid",
    "summary": "Gaussian likelihood of teacher maps under a learned regression of student maps (Ahn et al. 2019)",
    "uses_teacher": True,
    "teacher_outputs_only": True,
    "params": {
        "teacher_taps": {"default": ["layer1", "layer2", "layer3"], "tap": "teacher", "help": "teacher feature maps, paired in order with student_taps"},
        "student_taps": {"default": ["layer1", "layer2", "layer3"], "tap": "student", "help": "student feature maps, as many as teacher_taps"},
        "init_pred_var": {"default": 5.0, "min": 0.0, "help": "each regressor's per-channel variance at the start (> eps)"},
        "eps": {"default": 1e-5, "min": 0.0, "help": "floor added to softplus(log_scale) to give the variance"},
        "weight": {"default": 1.0, "min": 0.0, "help": "VID term = weight x sum over pairs of mean 0.5 x (log var + (pred - teacher)^2 / var)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}


class VariationalRegressor(nn.Module):
    """RepDistiller's VIDLoss for one layer pair: a Gaussian over the teacher's map given the student's."""

    def __init__(self, student_channels: int, mid_channels: int, teacher_channels: int, init_pred_var: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(student_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, teacher_channels, kernel_size=1, bias=False),
        )
        # softplus^-1(init_pred_var - eps), so that the variance starts at init_pred_var.
        start = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), start))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        """The per-channel variance, shaped (1, C, 1, 1) to broadcast over a map."""
        return (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """Mean over batch, channels and positions of 0.5 x (log var + (pred - teacher)^2 / var)."""
        if student_map.shape[2] > teacher_map.shape[2]:
            student_map = F.adaptive_avg_pool2d(student_map, teacher_map.shape[2:])
        elif student_map.shape[2] < teacher_map.shape[2]:
            teacher_map = F.adaptive_avg_pool2d(teacher_map, student_map.shape[2:])
        variance = self.variance()
        return (0.5 * ((self.mean(student_map) - teacher_map) ** 2 / variance + variance.log())).mean()


@register_method
class VID(TapListPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        self.regressors = nn.ModuleList()
        for teacher_tap, student_tap in zip(self.params["teacher_taps"], self.params["student_taps"]):
            teacher_channels = context.teacher_tap_shapes[teacher_tap][0]
            self.regressors.append(VariationalRegressor(
                context.student_tap_shapes[student_tap][0], teacher_channels, teacher_channels,
                self.params["init_pred_var"], self.params["eps"],
            ))

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """The two lists pair up one to one, every tap is a (C, H, W) map, and the variance can start
        at init_pred_var (softplus only reaches values above eps)."""
        map_pairs(context, params)
        if params["init_pred_var"] <= params["eps"]:
            raise MethodConfigError(
                "init_pred_var", f"{params['init_pred_var']!r} must exceed eps = {params['eps']!r}, the smallest variance"
            )

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        pairs = zip(self.regressors, self.params["student_taps"], self.params["teacher_taps"])
        vid = sum(regressor(student.features[s_tap], teacher.features[t_tap].detach()) for regressor, s_tap, t_tap in pairs)
        return {
            "ce": self.cross_entropy(student, batch),
            "vid": self.params["weight"] * vid,
        }

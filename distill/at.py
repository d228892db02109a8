"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017), as
RepDistiller computes it (distiller_zoo/AT.py, helper/loops.py, scripts/run_cifar_distill.sh).

A feature map's attention map is the mean over channels of F^p (p = 2), flattened and scaled to unit L2
norm per sample, so teacher and student may have different channel counts. For each listed pair of
taps the term is the mean over batch and positions of the squared difference of the two attention
maps; the pairs' terms are summed and multiplied by ``weight`` (RepDistiller's -b 1000 for
``--distill attention``, with -r 1 on cross-entropy and -a 0 on KD). RepDistiller reads
feat[1:-1], the outputs of the three residual stages: layer1, layer2, layer3 here.

Where the two maps of a pair differ in spatial size, the larger is average-pooled to the smaller
(``adaptive_avg_pool2d``), as RepDistiller's at_loss does; it pools both sides to the smaller
height (its maps are square), here to the smaller height and the smaller width.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from distill._feature_maps import map_pairs
from distill.base import Batch, MethodContext, ModelOutput, TapListPairMethod, register_method

METHOD = {
    "name": "at",
    "summary": "squared difference of L2-normalised channel-mean |F|^p attention maps, summed over tap pairs (Zagoruyko & Komodakis 2017)",
    "uses_teacher": True,
    "teacher_outputs_only": True,
    "per_sample_loss": True,
    "params": {
        "teacher_taps": {"default": ["layer1", "layer2", "layer3"], "tap": "teacher", "help": "teacher feature maps, paired in order with student_taps"},
        "student_taps": {"default": ["layer1", "layer2", "layer3"], "tap": "student", "help": "student feature maps, paired in order with teacher_taps"},
        "p": {"default": 2, "min": 1, "help": "exponent p of the attention map mean_c F_c^p (an even p gives |F_c|^p)"},
        "weight": {"default": 1000.0, "min": 0.0, "help": "AT term = weight x sum over tap pairs of mean (a_s - a_t)^2 (RepDistiller's -b)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}


def attention_map(features: torch.Tensor, p: int) -> torch.Tensor:
    """(N, H*W) attention of an (N, C, H, W) map: mean over channels of F^p, each row scaled to unit L2
    norm. RepDistiller raises F itself to p, not |F|; for the default p = 2 the two agree."""
    return F.normalize(features.pow(p).mean(1).flatten(1), dim=1)


def attention_term(student_map: torch.Tensor, teacher_map: torch.Tensor, p: int) -> torch.Tensor:
    """Mean over batch and positions of (a_s - a_t)^2, the larger map first pooled to the smaller size."""
    height = min(student_map.shape[2], teacher_map.shape[2])
    width = min(student_map.shape[3], teacher_map.shape[3])
    if student_map.shape[2:] != (height, width):
        student_map = F.adaptive_avg_pool2d(student_map, (height, width))
    if teacher_map.shape[2:] != (height, width):
        teacher_map = F.adaptive_avg_pool2d(teacher_map, (height, width))
    return (attention_map(student_map, p) - attention_map(teacher_map, p)).pow(2).mean()


@register_method
class AT(TapListPairMethod):
    METHOD = METHOD

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both lists name (C, H, W) maps and pair up one to one; spatial sizes may differ (pooled)."""
        map_pairs(context, params)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        p = self.params["p"]
        at = sum(
            attention_term(student.features[s_tap], teacher.features[t_tap].detach(), p)
            for t_tap, s_tap in zip(self.params["teacher_taps"], self.params["student_taps"])
        )
        return {
            "ce": self.cross_entropy(student, batch),
            "at": self.params["weight"] * at,
        }

"""Similarity-preserving distillation (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
ICCV 2019), as RepDistiller computes it (distiller_zoo/SP.py, helper/loops.py,
scripts/run_cifar_distill.sh).

Each network's feature map is flattened per sample to (N, C*H*W) and turned into the batch's
similarity matrix G = F F^T (N x N); each row of G is scaled to unit L2 norm. The term is
||G_t - G_s||_F^2 / N^2 times ``weight``: 3000, RepDistiller's -b for ``--distill similarity``
(with -r 1 on cross-entropy and -a 0 on KD). Only batch-by-batch similarities are compared, so
teacher and student maps may differ in every size. RepDistiller taps feat[-2], the last feature
map before pooling: layer3 here.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from distill._feature_maps import feature_map_shape
from distill.base import Batch, MethodContext, ModelOutput, TapPairMethod, register_method

METHOD = {
    "name": "sp",
    "summary": "squared Frobenius distance / N^2 of row-normalised batch similarity matrices F F^T (Tung & Mori 2019)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "layer3", "tap": "teacher", "help": "teacher feature map whose batch similarities are matched"},
        "student_tap": {"default": "layer3", "tap": "student", "help": "student feature map whose batch similarities are matched"},
        "weight": {"default": 3000.0, "min": 0.0, "help": "SP term = weight x ||G_t - G_s||_F^2 / N^2 (RepDistiller's -b)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """The (N, N) matrix F F^T of the flattened samples, each row scaled to unit L2 norm."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def similarity_term(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """||G_t - G_s||_F^2 / N^2 for a batch of N samples."""
    batch_size = student_map.shape[0]
    difference = similarity_matrix(teacher_map) - similarity_matrix(student_map)
    return difference.pow(2).sum() / batch_size**2


@register_method
class SP(TapPairMethod):
    METHOD = METHOD

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both taps must be (C, H, W) maps (a pooled (D,) tap is refused: RepDistiller reads the map)."""
        for key in ("teacher_tap", "student_tap"):
            feature_map_shape(context, params, key)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        sp = similarity_term(student.features[self.params["student_tap"]], teacher.features[self.params["teacher_tap"]].detach())
        return {
            "ce": self.cross_entropy(student, batch),
            "sp": self.params["weight"] * sp,
        }

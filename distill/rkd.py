"""Relational knowledge distillation (Park, Kim, Lu & Cho, "Relational Knowledge Distillation",
CVPR 2019), as RepDistiller computes it (distiller_zoo/RKD.py, helper/loops.py,
scripts/run_cifar_distill.sh).

Two relations among the batch's embeddings, each compared with smooth L1 (threshold 1, mean over
all entries):

* distance: the (N, N) Euclidean distances between samples (squared distances clamped at 1e-12
  before the square root, diagonal set to 0), each side divided by its mean non-zero distance;
* angle: the (N, N, N) cosines <e_ij, e_ik> with e_ij the unit vector from sample i to sample j
  (a zero difference stays a zero vector, so degenerate triples contribute 0 on both sides).

Weights 25 (distance) and 50 (angle) are RepDistiller's w_d and w_a; its -b is 1 for
``--distill rkd`` (with -r 1 on cross-entropy and -a 0 on KD), so they are the whole weights. The
two terms are logged separately. RepDistiller taps feat[-1], the pooled embedding: "pool" here.
Teacher relations carry no gradient.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from distill._feature_maps import embedding_size
from distill.base import Batch, MethodContext, ModelOutput, TapPairMethod, register_method

METHOD = {
    "name": "rkd",
    "summary": "smooth L1 between teacher and student pairwise-distance and triplet-angle relations of the batch (Park et al. 2019)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "pool", "tap": "teacher", "help": "teacher (D,) embedding"},
        "student_tap": {"default": "pool", "tap": "student", "help": "student (D,) embedding"},
        "distance_weight": {"default": 25.0, "min": 0.0, "help": "rkd_distance = weight x smooth L1 of mean-normalised pairwise distances (RepDistiller's w_d)"},
        "angle_weight": {"default": 50.0, "min": 0.0, "help": "rkd_angle = weight x smooth L1 of triplet angle cosines (RepDistiller's w_a)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}


def pairwise_distances(embedding: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, N) Euclidean distances, squared ones clamped at ``eps`` before the root, diagonal 0."""
    squared_norms = embedding.pow(2).sum(dim=1)
    squared = (squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * embedding @ embedding.t()).clamp(min=eps)
    off_diagonal = 1.0 - torch.eye(len(embedding), dtype=embedding.dtype, device=embedding.device)
    return squared.sqrt() * off_diagonal


def normalised_distances(embedding: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(embedding)
    return distances / distances[distances > 0].mean()


def angle_cosines(embedding: torch.Tensor) -> torch.Tensor:
    """(N, N, N): entry [i, j, k] is the cosine of the angle at sample i between samples j and k."""
    directions = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)
    return directions @ directions.transpose(1, 2)


def rkd_terms(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (distance, angle) smooth L1 terms between the two embeddings' relations."""
    student, teacher = student_embedding.flatten(1), teacher_embedding.flatten(1)
    with torch.no_grad():
        teacher_distances = normalised_distances(teacher)
        teacher_angles = angle_cosines(teacher)
    distance = F.smooth_l1_loss(normalised_distances(student), teacher_distances)
    angle = F.smooth_l1_loss(angle_cosines(student), teacher_angles)
    return distance, angle


@register_method
class RKD(TapPairMethod):
    METHOD = METHOD

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both taps must be (D,) embeddings; D may differ between teacher and student."""
        for key in ("teacher_tap", "student_tap"):
            embedding_size(context, params, key)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        distance, angle = rkd_terms(student.features[self.params["student_tap"]], teacher.features[self.params["teacher_tap"]].detach())
        return {
            "ce": self.cross_entropy(student, batch),
            "rkd_distance": self.params["distance_weight"] * distance,
            "rkd_angle": self.params["angle_weight"] * angle,
        }

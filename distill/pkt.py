"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018), as RepDistiller computes it (distiller_zoo/PKT.py,
taken there from the authors' code; helper/loops.py; scripts/run_cifar_distill.sh).

Each network's embedding (N, D) is scaled to unit length per sample (norm + eps in the denominator,
NaNs set to 0), the cosine similarities between samples are mapped to [0, 1] by (s + 1) / 2, and
each row is divided by its sum: row i is a distribution over the batch, the conditional probability
of sample j given sample i. The term is the mean over all N^2 entries (not the sum over each row,
so it is the usual KL divided by N) of p_t log((p_t + eps) / (p_s + eps)), eps = 1e-7, times
``weight``: 30000, RepDistiller's -b for ``--distill pkt`` (with -r 1 on cross-entropy and -a 0 on
KD). RepDistiller taps feat[-1], the pooled embedding: "pool" here. The diagonal (each sample with
itself) stays in, as in the released code.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from distill._feature_maps import embedding_size
from distill.base import Batch, MethodContext, ModelOutput, TapPairMethod, register_method

METHOD = {
    "name": "pkt",
    "summary": "KL between cosine-similarity conditional distributions of teacher and student embeddings (Passalis & Tefas 2018)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "pool", "tap": "teacher", "help": "teacher (D,) embedding"},
        "student_tap": {"default": "pool", "tap": "student", "help": "student (D,) embedding"},
        "weight": {"default": 30000.0, "min": 0.0, "help": "PKT term = weight x mean over N^2 pairs of p_t log((p_t + eps) / (p_s + eps)) (RepDistiller's -b)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}

EPS = 1e-7  # RepDistiller's cosine_similarity_loss eps, in the normalisation and inside the log


def conditional_probabilities(embedding: torch.Tensor) -> torch.Tensor:
    """(N, N): row i is ((cos(x_i, x_j) + 1) / 2) / sum_j of the same."""
    flat = embedding.flatten(1)
    unit = flat / (flat.norm(dim=1, keepdim=True) + EPS)
    unit = unit.masked_fill(unit.isnan(), 0.0)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_term(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Mean over all N^2 entries of p_t log((p_t + eps) / (p_s + eps))."""
    p_student = conditional_probabilities(student_embedding)
    p_teacher = conditional_probabilities(teacher_embedding)
    return (p_teacher * torch.log((p_teacher + EPS) / (p_student + EPS))).mean()


@register_method
class PKT(TapPairMethod):
    METHOD = METHOD

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both taps must be (D,) embeddings; D may differ between teacher and student."""
        for key in ("teacher_tap", "student_tap"):
            embedding_size(context, params, key)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        pkt = pkt_term(student.features[self.params["student_tap"]], teacher.features[self.params["teacher_tap"]].detach())
        return {
            "ce": self.cross_entropy(student, batch),
            "pkt": self.params["weight"] * pkt,
        }

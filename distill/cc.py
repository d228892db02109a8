"""Correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV
2019), as RepDistiller computes it (distiller_zoo/CC.py, "code emailed to me by the original
author"; train_student.py and helper/loops.py for the embeddings; scripts/run_cifar_distill.sh).

The paper matches the batch's correlation matrices under a Gaussian RBF kernel, approximated by
a P-order Taylor series. The released code does not: each side's pooled embedding is mapped by a
learned linear layer (RepDistiller's LinearEmbed, no normalisation) to ``embed_dim`` = 128
(its --feat_dim), and with delta_i = |e_s,i - e_t,i| the term is
mean over i < N of sum_k delta_i,k x delta_i+1,k: the correlation of consecutive samples'
embedding differences. This file implements the released form, because that is the one whose
weight, 0.02 (RepDistiller's -b for ``--distill correlation``, with -r 1 on cross-entropy and -a 0
on KD), has been tuned and reported; the paper's kernel has no published weight for these pairs.

Both linear embeddings are trained with the student, the teacher's too (RepDistiller puts embed_t
in its trainable list); the teacher's pooled features themselves carry no gradient. As in the
released code nothing stops both embeddings from shrinking towards 0, which also drives the term
to 0; the small weight keeps that drift slow.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from distill._feature_maps import embedding_size
from distill.base import Batch, MethodContext, ModelOutput, TapPairMethod, register_method

METHOD = {
    "name": "cc",
    "summary": "correlation of consecutive samples' |student - teacher| linear embeddings, as RepDistiller's released CC (Peng et al. 2019)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "pool", "tap": "teacher", "help": "teacher (D,) embedding"},
        "student_tap": {"default": "pool", "tap": "student", "help": "student (D,) embedding"},
        "embed_dim": {"default": 128, "min": 1, "help": "output size of the two learned linear embeddings (RepDistiller's --feat_dim)"},
        "weight": {"default": 0.02, "min": 0.0, "help": "CC term = weight x mean_i sum_k |d_i,k| |d_i+1,k|, d = embed_s(s) - embed_t(t) (RepDistiller's -b)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}


def correlation_term(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Mean over i in 0..N-2 of sum_k |d_i,k| x |d_i+1,k| with d = student - teacher, both (N, K)."""
    delta = (student_embedding - teacher_embedding).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register_method
class CC(TapPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        embed_dim = self.params["embed_dim"]
        self.student_embed = nn.Linear(embedding_size(context, self.params, "student_tap"), embed_dim)
        self.teacher_embed = nn.Linear(embedding_size(context, self.params, "teacher_tap"), embed_dim)

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both taps must be (D,) embeddings; D may differ between teacher and student."""
        for key in ("teacher_tap", "student_tap"):
            embedding_size(context, params, key)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        student_embedding = self.student_embed(student.features[self.params["student_tap"]].flatten(1))
        teacher_embedding = self.teacher_embed(teacher.features[self.params["teacher_tap"]].detach().flatten(1))
        return {
            "ce": self.cross_entropy(student, batch),
            "cc": self.params["weight"] * correlation_term(student_embedding, teacher_embedding),
        }

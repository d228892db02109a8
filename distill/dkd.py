"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
Distillation", CVPR 2022).

KD's KL splits into a target-class part (TCKD: the binary split "true class" vs "all others" of
teacher and student) and a non-target part (NCKD: the distribution among the wrong classes, with
the true class removed), and the split shows that plain KD lets the teacher's confidence damp the
NCKD term. DKD weights the two freely: ``alpha x TCKD + beta x NCKD``.

As the authors' released code computes it (megvii-research/mdistiller,
``mdistiller/distillers/DKD.py`` with the CIFAR-100 defaults of ``mdistiller/engine/cfg.py``:
CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20):

* TCKD: softmax at T of both logits, each summed into [p(true class), p(others)]; KL of the
  teacher's pair from the student's, summed over the batch, x T^2 / batch size;
* NCKD: the true class's logit pushed down by ``1000 x gt_mask`` after the division by T, so its
  softmax share is ~0 and the remaining classes renormalise among themselves; KL summed over the
  batch, x T^2 / batch size;
* the whole DKD term ramps up linearly: mdistiller multiplies it by ``min(epoch / WARMUP, 1)`` with
  its 1-based epoch (the first epoch has 1 / 20); kdbench's ``batch.epoch`` is 0-based, so the factor
  here is ``min((batch.epoch + 1) / warmup_epochs, 1)``: the same value for the same epoch of training.

The terms logged are ``ce``, ``tckd`` and ``nckd``, each with its weight and the warm-up factor.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from distill.base import Batch, Method, MethodConfigError, MethodContext, ModelOutput, register_method

METHOD = {
    "name": "dkd",
    "summary": "decoupled KD: alpha x target-class KL + beta x non-target-class KL, warmed up (Zhao et al. 2022)",
    "uses_teacher": True,
    "per_sample_loss": True,
    "teacher_outputs_only": True,
    "params": {
        "temperature": {"default": 4.0, "min": 0.01, "help": "softmax temperature T (> 0) of both KL terms"},
        "alpha": {"default": 1.0, "min": 0.0, "help": "weight of TCKD, the KL of the binary split true class / others"},
        "beta": {"default": 8.0, "min": 0.0, "help": "weight of NCKD, the KL among the non-target classes"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
        "warmup_epochs": {
            "default": 20,
            "min": 1,
            "help": "epochs over which the DKD weight ramps linearly to 1: (epoch + 1) / warmup_epochs, 0-based epoch",
        },
    },
    "pre_stage": None,
}

# mdistiller's NCKD subtracts 1000 from the true class's softened logit, so its share of the
# softmax is exp(-1000) ~ 0 and the other classes' distribution is what remains.
_MASK_OFFSET = 1000.0


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """mdistiller's ``min(epoch / warmup, 1)`` for its 1-based epoch, given kdbench's 0-based one."""
    return min((epoch + 1) / warmup_epochs, 1.0)


def tckd_nckd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (TCKD, NCKD), each a KL summed over the batch, x T^2 / batch size."""
    gt_mask = F.one_hot(labels, student_logits.shape[1]).to(student_logits.dtype)
    other_mask = 1.0 - gt_mask
    batch_size = labels.shape[0]
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)

    def binary(p: torch.Tensor) -> torch.Tensor:
        return torch.stack(((p * gt_mask).sum(dim=1), (p * other_mask).sum(dim=1)), dim=1)

    tckd = F.kl_div(torch.log(binary(p_student)), binary(p_teacher), reduction="sum")
    log_p_student_others = F.log_softmax(student_logits / temperature - _MASK_OFFSET * gt_mask, dim=1)
    p_teacher_others = F.softmax(teacher_logits / temperature - _MASK_OFFSET * gt_mask, dim=1)
    nckd = F.kl_div(log_p_student_others, p_teacher_others, reduction="sum")
    scale = temperature**2 / batch_size
    return tckd * scale, nckd * scale


@register_method
class DKD(Method):
    METHOD = METHOD

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """The target/non-target split indexes the teacher's logits by the data set's labels, so the
        teacher must predict the data set's classes (a teacher of another data set cannot)."""
        teacher_classes = context.teacher_tap_shapes.get("fc")
        if teacher_classes is not None and tuple(teacher_classes) != (context.num_classes,):
            raise MethodConfigError(
                "teacher", f"the teacher predicts {teacher_classes[0]} classes and the data set has {context.num_classes}; "
                           "DKD splits the teacher's logits at each sample's label, so both must have the same classes",
            )

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        tckd, nckd = tckd_nckd(student.logits, teacher.logits.detach(), batch.labels, self.params["temperature"])
        ramp = warmup_factor(batch.epoch, self.params["warmup_epochs"])
        return {
            "ce": self.cross_entropy(student, batch),
            "tckd": ramp * self.params["alpha"] * tckd,
            "nckd": ramp * self.params["beta"] * nckd,
        }

"""Knowledge distillation on softened logits (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
Neural Network", 2015).

The student matches the teacher's class distribution at temperature T, where the small
probabilities of wrong classes (the "dark knowledge") become visible. The KL term is scaled by
T^2 because its gradients shrink as 1/T^2; without it, changing T would also change the balance
between the two terms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.base import Batch, Method, ModelOutput, register_method

METHOD = {
    "name": "kd",
    "summary": "KL between temperature-softened teacher and student logits (Hinton et al. 2015)",
    "uses_teacher": True,
    "params": {
        "temperature": {"default": 4.0, "min": 0.01, "help": "softmax temperature T (> 0)"},
        "ce_weight": {"default": 0.1, "min": 0.0, "help": "weight of the cross-entropy on labels"},
        "kd_weight": {"default": 0.9, "min": 0.0, "help": "weight of T^2 x KL(teacher || student)"},
    },
    "pre_stage": None,
}


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(softmax(t/T) || softmax(s/T)), summed over classes and averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


@register_method
class KD(Method):
    METHOD = METHOD

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        kd = soft_target_kl(student.logits, teacher.logits.detach(), self.params["temperature"])
        return {
            "ce": self.params["ce_weight"] * F.cross_entropy(student.logits, batch.labels),
            "kd": self.params["kd_weight"] * kd,
        }

"""Comparative knowledge distillation (Wilf, Xu, Liang, Obolenskiy, Fried & Morency, "Comparative
Knowledge Distillation", arXiv 2311.02253, 2023; WACV 2025).

When teacher calls are scarce, every teacher output should teach more than one thing. CKD makes the
student match the teacher's *differences* between samples: from N teacher outputs it can draw far
more than N comparisons, each a new target without a new teacher call. A comparison takes a group
of k samples, splits it into a "positive" part of k - k // 2 samples and a "negative" part of
k // 2, and compares the mean logits of the one with the mean logits of the other.

The paper's own text was not in the reference index; this follows the authors' released code
(alextxu/ckd, commit 62ba741, ``--relational ckd``):

* ``helper/CKDTrainHelpers.py``: the compared quantity is the logits; the difference is
  ``mean(student logits of the positives) - mean(... of the negatives)``, and the teacher's is
  the same difference of its (cached) logits, taken in ``dataset/sampling/CKDSample.py``.
* ``train_student.py``: the distance is RepDistiller's ``DistillKL`` at ``kd_T`` 4,
  ``T^2 x KL(softmax(dt / T) || softmax(ds / T))`` summed over classes and averaged over the
  comparisons; its weight is ``w_rel_defaults['ckd']`` 1 (x ``w_rel_scale`` 1). ``--pos_and_neg``
  defaults to 3 (two positives, one negative); its ``ckd.yml`` sweeps 2 (pairs) and 3.
* Cross-entropy on single samples is not used (``w_kd`` is 0 too): for ``ckd`` the code's
  classification criterion is ``DistillKL`` as well, applied to the same student difference with
  the difference of the groups' label vectors (each member adds 1/|part| to its class) as the
  "teacher logits", at ``w_cls`` 1. That is ``label`` here; ``ce_weight`` (default 0) adds the
  plain cross-entropy the code leaves out.

One departure, so that the teacher sees only the batch's images and resume stays exact: the code
draws its tuples at random from the whole training set once per run (up to 100,000 of them, 64 per
step, each image forwarded anew in every tuple). Here the comparisons come from within the batch
with a fixed pattern: comparison i takes samples i, i+1, ..., i+k-1 of the batch (modulo N), the
first k - k // 2 positive, the rest negative; N comparisons per batch. The batch order is already
shuffled per epoch from the seed, so partners change every epoch and need no random numbers. A
batch smaller than k wraps onto itself, and a sample may then sit in both parts.

A student whose logits are the teacher's plus any one vector c for all samples scores exactly zero:
c cancels in every difference. So does one that adds a per-sample constant to all of a sample's
logits, which softmax ignores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.base import Batch, Method, ModelOutput, register_method

METHOD = {
    "name": "ckd",
    "summary": "student matches the teacher's logit differences between groups of samples in the batch, T^2 KL (Wilf et al. 2023)",
    "uses_teacher": True,
    "teacher_outputs_only": True,
    "params": {
        "group_size": {"default": 3, "min": 2, "help": "samples per comparison, k: mean logits of k - k//2 positives minus those of k//2 negatives (2 = pairs; the code's --pos_and_neg)"},
        "temperature": {"default": 4.0, "min": 0.01, "help": "softmax temperature T (> 0) of both KL terms (the code's kd_T)"},
        "weight": {"default": 1.0, "min": 0.0, "help": "weight of T^2 x KL(softmax(dt/T) || softmax(ds/T)) over the comparisons (the code's w_rel)"},
        "label_weight": {"default": 1.0, "min": 0.0, "help": "weight of the same KL with the difference of the groups' label vectors in place of dt (the code's w_cls)"},
        "ce_weight": {"default": 0.0, "min": 0.0, "help": "weight of the plain cross-entropy on each sample's label, which the code does not use"},
    },
    "pre_stage": None,
}


def comparison_groups(batch_size: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives): index matrices (N, k - k//2) and (N, k//2); row i holds batch samples
    i, i+1, ..., i+k-1 modulo N, split in that order."""
    window = (torch.arange(batch_size).unsqueeze(1) + torch.arange(group_size).unsqueeze(0)) % batch_size
    positives = group_size - group_size // 2
    return window[:, :positives], window[:, positives:]


def group_differences(rows: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Mean of the positives' rows minus mean of the negatives' rows, one row per comparison."""
    return rows[positives].mean(dim=1) - rows[negatives].mean(dim=1)


def soft_kl(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """RepDistiller's DistillKL: T^2 x KL(softmax(target/T) || softmax(student/T)), summed over classes
    and averaged over rows."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_target = F.log_softmax(target / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_target, log_target=True, reduction="batchmean") * temperature**2


@register_method
class CKD(Method):
    METHOD = METHOD

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        temperature = self.params["temperature"]
        logits = student.logits
        positives, negatives = comparison_groups(logits.shape[0], self.params["group_size"])
        positives, negatives = positives.to(logits.device), negatives.to(logits.device)
        student_difference = group_differences(logits, positives, negatives)
        teacher_difference = group_differences(teacher.logits.detach(), positives, negatives)
        one_hot = F.one_hot(batch.labels, logits.shape[1]).to(logits.dtype)
        label_difference = group_differences(one_hot, positives, negatives)
        return {
            "ce": self.cross_entropy(student, batch),
            "ckd": self.params["weight"] * soft_kl(student_difference, teacher_difference, temperature),
            "label": self.params["label_weight"] * soft_kl(student_difference, label_difference, temperature),
        }

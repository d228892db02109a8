"""Supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020) on
the student's own embeddings, as the authors' released code computes it (HobbitLong/SupContrast:
losses.py SupConLoss, networks/resnet_big.py SupConResNet, main_supcon.py).

The student's tap (default "pool", the pooled penultimate feature) goes through a trainable
projection head and is scaled to unit length (SupConResNet: ``head='mlp'`` is Linear(D, D), ReLU,
Linear(D, 128); ``head='linear'`` is Linear(D, 128); then F.normalize). With z the unit embeddings
of the batch, A(i) every other sample and P(i) the other samples of i's label, the term is the
paper's eq. 2 (L_out), scaled as SupConLoss scales it:

    -(temperature / base_temperature) x mean_i 1/|P(i)| sum_{p in P(i)} log softmax_{a in A(i)}(z_i . z_a / temperature)_p

Defaults are the released ones: temperature 0.07 (main_supcon.py --temp), base_temperature 0.07
(SupConLoss's default, which main_supcon.py leaves alone, so the scale is 1), head mlp, feat_dim 128.

Here the batch holds one view per sample (SupConLoss's ``n_views`` = 1), so an anchor whose label
is alone in the batch has no positive. The 2020 SupConLoss divides by ``mask.sum(1)`` = 0 there and
the whole loss becomes NaN (SupContrast issues #50 and #141); the later guard in that file divides
by 1 instead, so such anchors count as 0 and dilute the mean. This file leaves them out of the mean:
the term is the average over anchors that have a positive, and 0 (still attached to the graph)
when no anchor has one, since a batch of all-distinct labels is a property of the draw, not a
setting to refuse. The log-softmax is the released one: each row shifted by its maximum, then
``log(sum of the others' exp + 1e-9)``.

ConKD (Contrastive KD with logit standardisation; the released notebook is
pariyajebreili/ConKD-Lion, resnet101-18-teacher-student.ipynb) trains kd_ls + alpha x SupCon on the
student's pooled features through the same MLP head (512 -> 512 -> ReLU -> 128, normalised). Its
alpha is not printed as a setting in the parts read, but its logged validation totals are exactly
kd + 0.15 x supcon (e.g. 0.28689 + 0.15 x 5.47727 = 1.10848), so alpha defaults to 0.15. That
combination is the sweep value ``kd+supcon`` (kd with logit_standardization true); ``supcon`` alone
adds only ce_weight x CE and reads no teacher.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill._feature_maps import embedding_size
from distill.base import Batch, Method, MethodContext, ModelOutput, register_method

METHOD = {
    "name": "supcon",
    "summary": "supervised contrastive loss on l2-normalised projections of the student's embeddings, no teacher (Khosla et al. 2020)",
    "uses_teacher": False,
    "params": {
        "student_tap": {"default": "pool", "tap": "student", "help": "student (D,) embedding fed to the projection head"},
        "head": {"default": "mlp", "choices": ["mlp", "linear"],
                 "help": "projection head: mlp = Linear(D, D), ReLU, Linear(D, feature_dim); linear = Linear(D, feature_dim) (SupConResNet's head)"},
        "feature_dim": {"default": 128, "min": 1, "help": "size of the l2-normalised projection (SupConResNet's feat_dim)"},
        "temperature": {"default": 0.07, "min": 0.001, "help": "temperature of the z_i . z_a / temperature similarities (main_supcon.py --temp)"},
        "base_temperature": {"default": 0.07, "min": 0.001, "help": "the loss is scaled by temperature / base_temperature (SupConLoss's base_temperature)"},
        "alpha": {"default": 0.15, "min": 0.0, "help": "weight of the SupCon term (ConKD's alpha in kd_ls + alpha x supcon)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}


def projection_head(kind: str, input_dim: int, feature_dim: int) -> nn.Module:
    """SupConResNet's head: an MLP with hidden width = input width, or a single linear layer."""
    if kind == "linear":
        return nn.Linear(input_dim, feature_dim)
    return nn.Sequential(nn.Linear(input_dim, input_dim), nn.ReLU(), nn.Linear(input_dim, feature_dim))


SUPCON_EPS = 1e-9  # SupContrast losses.py, inside the log of the softmax denominator


def supcon_term(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float, base_temperature: float) -> torch.Tensor:
    """Eq. 2 (L_out) on unit embeddings (N, K), one view each, averaged over anchors with a positive."""
    count = len(labels)
    self_mask = torch.eye(count, dtype=torch.bool, device=labels.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    similarity = embeddings @ embeddings.t() / temperature
    # As SupConLoss: shift each row by its (detached) maximum, self included, then log(sum exp + 1e-9)
    # over the others; the epsilon matters only when every other score is ~1e-9 below the row's top.
    shifted = similarity - similarity.max(dim=1, keepdim=True).values.detach()
    others = shifted.exp().masked_fill(self_mask, 0.0).sum(dim=1, keepdim=True)
    log_prob = shifted - torch.log(others + SUPCON_EPS)
    positive_count = positives.sum(dim=1)
    # clamp keeps 0/0 (and its NaN gradient) out of the anchors that the selection below drops
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / positive_count.clamp(min=1)
    has_positive = positive_count > 0
    per_anchor = -(temperature / base_temperature) * mean_log_prob[has_positive]
    return per_anchor.sum() / has_positive.sum().clamp(min=1)


@register_method
class SupCon(Method):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        input_dim = embedding_size(context, self.params, "student_tap")
        self.head = projection_head(self.params["head"], input_dim, self.params["feature_dim"])

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """The tap must be a (D,) embedding, as the released head sits on the pooled encoder output."""
        embedding_size(context, params, "student_tap")

    @property
    def student_taps(self) -> tuple[str, ...]:
        return (self.params["student_tap"],)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        embeddings = F.normalize(self.head(student.features[self.params["student_tap"]].flatten(1)), dim=1)
        supcon = supcon_term(embeddings, batch.labels, self.params["temperature"], self.params["base_temperature"])
        return {
            "ce": self.cross_entropy(student, batch),
            "supcon": self.params["alpha"] * supcon,
        }

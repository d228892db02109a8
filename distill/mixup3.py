"""Knowledge distillation on images mixed from three samples: ``distill/mixup.py`` with big_vision's
``mixup(..., n=3)`` (google-research/big_vision, ``big_vision/utils.py``): the weights are one
Dirichlet(alpha, alpha, alpha) draw per batch (the three-sample generalisation of mixup's
Beta(alpha, alpha)), sorted so the largest goes to the sample itself; the two partners come from
two independent random permutations of the batch, so a partner may repeat the sample or the other
partner. The loss is mixup's: ``kd_weight`` x T^2 KL on the mixed images plus ``ce_weight`` x the
weighted CE to each of the three labels; the defaults are mixup's (alpha 1, the uniform
distribution on the simplex, big_vision's distillation p = 1.0; T 4, 0.9 / 0.1 as kd).
"""
from __future__ import annotations

from distill.base import register_method
from distill.mixup import Mixup

METHOD = {
    "name": "mixup3",
    "summary": "KD on images mixed from three samples with Dirichlet(alpha, alpha, alpha) weights, shown to teacher and student alike",
    "uses_teacher": True,
    "params": {
        "alpha": {"default": 1.0, "min": 0.0001,
                  "help": "Dirichlet(alpha, alpha, alpha) concentration of the mixing weights (> 0; 1 = uniform, small = little mixing)"},
        "temperature": {"default": 4.0, "min": 0.01, "help": "softmax temperature T (> 0) of the KD term"},
        "kd_weight": {"default": 0.9, "min": 0.0, "help": "weight of T^2 x KL(teacher || student) on the mixed images"},
        "ce_weight": {"default": 0.1, "min": 0.0,
                      "help": "weight of the mixed-label cross-entropy, sum over partners of weight x CE to that partner's label"},
    },
    "pre_stage": None,
}


@register_method
class Mixup3(Mixup):
    METHOD = METHOD
    SAMPLES = 3

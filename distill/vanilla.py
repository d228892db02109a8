"""The control: the student trained on labels alone, so every other method has a baseline to beat.

Label smoothing (Szegedy et al., CVPR 2016) is on by default because it is the usual recipe for a
student trained from scratch; set it to 0.0 for plain cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.base import Batch, Method, ModelOutput, register_method

METHOD = {
    "name": "vanilla",
    "summary": "cross-entropy with label smoothing, no teacher (the control)",
    "uses_teacher": False,
    "per_sample_loss": True,
    "params": {
        "label_smoothing": {
            "default": 0.1,
            "min": 0.0,
            "max": 1.0,
            "help": "share of the target mass spread evenly over all classes (0 = plain cross-entropy)",
        },
    },
    "pre_stage": None,
}


@register_method
class Vanilla(Method):
    METHOD = METHOD

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        smoothing = self.params["label_smoothing"]
        return {"ce": F.cross_entropy(student.logits, batch.labels, label_smoothing=smoothing)}

"""Knowledge distillation on mixup images: each training image is a convex combination of two samples
of the batch (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018), and the teacher
and the student both see that same mixed image (the "consistent teaching" / function matching of
Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022), so the
student matches the teacher's function between the training samples, not only on them.

Facts taken from the released code:

* facebookresearch/mixup-cifar10, ``train.py`` (``mixup_data``, ``mixup_criterion``, ``--alpha``
  default 1): one ``lam ~ Beta(alpha, alpha)`` per batch, partners by ``torch.randperm`` of the batch,
  ``mixed = lam x + (1 - lam) x[perm]``, loss ``lam CE(pred, y) + (1 - lam) CE(pred, y[perm])``.
* google-research/big_vision, ``big_vision/utils.py`` ``mixup`` and the distillation configs
  ``configs/proj/distill/bit_i1k.py`` (``mixup = dict(p=1.0, n=2)``, ``distance = 'kl'``, t 1) with
  ``trainers/proj/distill/distill.py`` (the loss is the distillation term only): the weights of
  the ``n`` images are one ``Dirichlet(p, ..., p)`` draw per batch (``fold_in=None``; one weight per
  sample is "usually a bad idea"), sorted in decreasing order so that a tiny concentration leaves
  each image itself rather than replacing it by its partner.

What this file does: weights ``w ~ Dirichlet(alpha, alpha)`` (i.e. ``w_1 = lam ~ Beta(alpha,
alpha)``, ``w_2 = 1 - lam``), one draw per batch, sorted so the larger weight goes to the sample
itself; the partner is a random permutation of the batch; ``mixed_i = w_1 x_i + w_2 x_perm(i)``. The
loss is ``kd_weight * soft_target_kl(student, teacher, T)`` (T^2 x batch-mean KL, distill.kd) on the
mixed image plus ``ce_weight * sum_j w_j CE(student, y_partner_j)``, Zhang's mixed-label CE.
Defaults: alpha 1 (Zhang's CIFAR default and big_vision's distillation p = 1.0), and kd's own T 4,
kd_weight 0.9, ce_weight 0.1, so a sweep's ``kd`` and ``mixup`` rows differ only in the images;
Beyer et al.'s pure function matching is ``temperature: 1, kd_weight: 1, ce_weight: 0``.

Randomness: every draw comes from ``batch.generator`` (seeded per (seed, epoch, step) by the
training loop), so a resumed epoch mixes the same images with the same weights. Torch has no
Beta/Dirichlet sampler that takes a generator, so one 62-bit integer drawn from it seeds
``numpy.random.default_rng``, whose ``dirichlet`` is exact (including concentrations far below 1,
where it samples by stick-breaking from Beta draws); the permutations are ``torch.randperm`` on
the same generator. ``distill/mixup3.py`` is the three-sample version (Dirichlet(alpha, alpha,
alpha), two permutations), big_vision's ``n=3``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from distill.base import Batch, Method, ModelOutput, register_method
from distill.kd import soft_target_kl

METHOD = {
    "name": "mixup",
    "summary": "KD on images mixed from two samples with Beta(alpha, alpha) weights, shown to teacher and student alike",
    "uses_teacher": True,
    "params": {
        "alpha": {"default": 1.0, "min": 0.0001,
                  "help": "Beta(alpha, alpha) concentration of the mixing weight (> 0; 1 = uniform, small = little mixing)"},
        "temperature": {"default": 4.0, "min": 0.01, "help": "softmax temperature T (> 0) of the KD term"},
        "kd_weight": {"default": 0.9, "min": 0.0, "help": "weight of T^2 x KL(teacher || student) on the mixed images"},
        "ce_weight": {"default": 0.1, "min": 0.0,
                      "help": "weight of the mixed-label cross-entropy, sum over partners of weight x CE to that partner's label"},
    },
    "pre_stage": None,
}


@dataclass(frozen=True, kw_only=True)
class MixedBatch(Batch):
    """A batch of mixed images: image i is ``sum_j weights[j] * original[partners[j, i]]``.

    ``partners`` (k, N) holds indices into the loader's batch, its first row the sample itself;
    ``weights`` are the k mixing weights of this batch, largest first. ``labels`` stay the loader's,
    i.e. each image's largest-weight label, which is what its train accuracy is counted against."""

    partners: torch.Tensor
    weights: tuple[float, ...]


def mixing_weights(alpha: float, count: int, generator: torch.Generator) -> tuple[float, ...]:
    """One Dirichlet(alpha, ..., alpha) draw of ``count`` weights, largest first, from ``generator``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    weights = np.random.default_rng(seed).dirichlet([alpha] * count)
    return tuple(float(weight) for weight in sorted(weights, reverse=True))


def mix(batch: Batch, alpha: float, count: int) -> MixedBatch:
    """The batch with each image mixed from itself and ``count - 1`` partners from random permutations."""
    if batch.generator is None:
        raise ValueError("mixup needs the training loop's batch.generator to draw its weights and partners")
    weights = mixing_weights(alpha, count, batch.generator)
    size = len(batch.labels)
    partners = torch.stack([torch.arange(size)] + [torch.randperm(size, generator=batch.generator) for _ in range(count - 1)])
    partners = partners.to(batch.images.device)
    images = sum(weight * batch.images[partner] for weight, partner in zip(weights, partners))
    return MixedBatch(images=images, labels=batch.labels, epoch=batch.epoch, indices=batch.indices,
                      generator=batch.generator, partners=partners, weights=weights)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Zhang et al.'s mixed-label loss: each weight times the batch-mean CE to its partners' labels."""
    return sum(weight * F.cross_entropy(logits, labels[partner]) for weight, partner in zip(weights, partners))


@register_method
class Mixup(Method):
    METHOD = METHOD
    SAMPLES: ClassVar[int] = 2
    """How many images each mixed image combines."""

    def prepare_batch(self, batch: Batch) -> Batch:
        return mix(batch, self.params["alpha"], self.SAMPLES)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        assert isinstance(batch, MixedBatch), "the training loop passes the batch prepare_batch returned"
        kd = soft_target_kl(student.logits, teacher.logits.detach(), self.params["temperature"])
        ce = mixed_cross_entropy(student.logits, batch.labels, batch.partners, batch.weights)
        return {"ce": self.params["ce_weight"] * ce, "kd": self.params["kd_weight"] * kd}

"""Contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020), as the authors' released code computes it (HobbitLong/RepDistiller:
crd/criterion.py, crd/memory.py, dataset/cifar100.py, train_student.py).

Each side's pooled embedding goes through a learned linear layer and an l2 normalisation (the
code's Embed, ``feat_dim`` 128). Two memory banks hold one embedding per training sample, the
student's and the teacher's, initialised uniform in [-1/sqrt(feat_dim/3), 1/sqrt(feat_dim/3)].
For each sample the student's embedding is scored against the teacher bank's row of the same
sample (the positive) and ``nce_k`` other rows (the negatives), and the teacher's embedding against
the student bank likewise: score = exp(bank_row . embedding / nce_t) / Z, where each side's Z is
set once, on the first batch, to mean(exp(...)) x number of training samples and then kept (the
code's Z_v1, Z_v2). Each side's NCE loss is ContrastLoss (the paper's Eq. 18) with noise
probability Pn = 1/n and K = nce_k:
-(sum_i log(P_i / (P_i + K Pn + eps)) + sum_i,j log(K Pn / (P_ij + K Pn + eps))) / N.
After scoring, the batch's own rows of each bank become the momentum average
nce_m x row + (1 - nce_m) x embedding, re-normalised to unit length. The banks and the Z pair
are buffers, saved in the checkpoint, so a resumed run continues with the same banks.

Defaults are RepDistiller's CIFAR-100 ones: nce_k 16384, nce_t 0.07, nce_m 0.5, feat_dim 128,
-b 0.8 on the term, -r 1 on cross-entropy (-a 0: no KD). Both embeddings are trained with the
student (the code puts embed_t in the trainable list); the teacher's features carry no gradient.

Negatives: the released training (``--mode exact``, CIFAR100InstanceSample.cls_negative) draws
each sample's ``nce_k`` negatives without replacement from the training samples of *other
classes*; ``negatives: other_classes`` (the default) does the same from the training labels the
stage hands the method. ``negatives: any_other_sample`` draws from every training sample but the
positive itself, for a run whose labels are not to be used. Every draw comes from the step's
seeded generator (``Batch.generator``), so a resumed epoch draws the negatives an uninterrupted
one would have.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from distill._feature_maps import embedding_size
from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, TapPairMethod, register_method

METHOD = {
    "name": "crd",
    "summary": "NCE contrast of student and teacher embeddings against memory banks of the training set (Tian et al. 2020)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "pool", "tap": "teacher", "help": "teacher (D,) embedding"},
        "student_tap": {"default": "pool", "tap": "student", "help": "student (D,) embedding"},
        "feat_dim": {"default": 128, "min": 1, "help": "size of the two l2-normalised linear embeddings and the bank rows (RepDistiller's --feat_dim)"},
        "nce_k": {"default": 16384, "min": 1, "help": "negatives per sample, drawn from the memory bank; the training set needs nce_k + 1 samples (--nce_k)"},
        "nce_t": {"default": 0.07, "min": 0.001, "help": "temperature of the exp(row . embedding / nce_t) scores (--nce_t)"},
        "nce_m": {"default": 0.5, "min": 0.0, "max": 1.0, "help": "momentum of the bank update row <- nce_m row + (1 - nce_m) embedding (--nce_m)"},
        "negatives": {"default": "other_classes", "choices": ["other_classes", "any_other_sample"],
                      "help": "where the nce_k negatives of a sample come from: training samples of other classes (RepDistiller's --mode exact), or any other training sample"},
        "weight": {"default": 0.8, "min": 0.0, "help": "weight of the sum of the student-side and teacher-side NCE losses (RepDistiller's -b)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels (-r)"},
    },
    "pre_stage": None,
}

EPS = 1e-7  # RepDistiller's crd/criterion.py eps


def normalise(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its l2 norm (RepDistiller's Normalize(2), without an epsilon)."""
    return rows / rows.pow(2).sum(dim=1, keepdim=True).sqrt()


def negative_candidates(indices: torch.Tensor, train_labels: torch.Tensor | None, train_size: int) -> torch.Tensor:
    """(N, train_size) weights, 1 where a training sample may be a negative of the batch's sample:
    every sample of another class when ``train_labels`` is given, else every sample but itself."""
    if train_labels is not None:
        return (train_labels[None, :] != train_labels[indices][:, None]).float()
    weights = torch.ones(len(indices), train_size, device=indices.device)
    weights[torch.arange(len(indices), device=indices.device), indices] = 0.0
    return weights


def draw_contrast_indices(
    indices: torch.Tensor, candidates: torch.Tensor, nce_k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, 1 + nce_k) bank rows per sample: its own index first, then nce_k distinct negatives drawn
    uniformly from its ``candidates`` row."""
    negatives = torch.multinomial(candidates, nce_k, replacement=False, generator=generator)
    return torch.cat([indices[:, None], negatives], dim=1)


def generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator for ``device`` seeded from the step's CPU generator (torch samples on a device
    only with that device's generator); None draws from torch's global one."""
    if generator is None or device.type == "cpu":
        return generator
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
    return seeded


def contrast_scores(embeddings: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, 1 + K) exp(bank[rows[i, j]] . embeddings[i] / temperature), before the division by Z.

    The dot products with the whole bank are one (N, D) x (D, n) product, then the rows are picked:
    gathering the (N, 1 + K, D) bank rows first, as RepDistiller does, copies half a gigabyte per
    side at CIFAR's sizes and is several times slower on a CPU; the values are the same. The bank
    is copied (25 MB at CIFAR's sizes) because backward needs it as it was, and the momentum update
    rewrites it in place before backward runs."""
    return torch.exp(torch.gather(embeddings @ bank.clone().t(), 1, rows) / temperature)


def contrast_loss(scores: torch.Tensor, train_size: int) -> torch.Tensor:
    """RepDistiller's ContrastLoss of (N, 1 + K) normalised scores, the positive in column 0."""
    negatives = scores.shape[1] - 1
    noise = negatives / train_size  # K x Pn, Pn = 1 / n
    log_positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_negative = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


@torch.no_grad()
def momentum_update(bank: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> None:
    """bank[indices] <- normalise(momentum x bank[indices] + (1 - momentum) x embeddings), in place."""
    rows = bank[indices] * momentum + embeddings * (1.0 - momentum)
    bank.index_copy_(0, indices, normalise(rows))


@register_method
class CRD(TapPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        if context.train_size <= 0:
            raise MethodConfigError("nce_k", "crd keeps a memory bank of the training set, but the training set size is not known")
        if self.params["negatives"] == "other_classes" and context.train_labels is None:
            raise MethodConfigError("negatives", "other_classes draws negatives by label, but the training labels are not known; "
                                                 "use negatives: any_other_sample")
        feat_dim = self.params["feat_dim"]
        self.student_embed = nn.Linear(embedding_size(context, self.params, "student_tap"), feat_dim)
        self.teacher_embed = nn.Linear(embedding_size(context, self.params, "teacher_tap"), feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("student_bank", torch.rand(context.train_size, feat_dim) * (2 * bound) - bound)
        self.register_buffer("teacher_bank", torch.rand(context.train_size, feat_dim) * (2 * bound) - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z of the student side, the teacher side; < 0: unset
        by_class = self.params["negatives"] == "other_classes"
        labels = torch.as_tensor(context.train_labels) if by_class else torch.zeros(0, dtype=torch.long)
        self.register_buffer("train_labels", labels, persistent=False)  # from the data, not the checkpoint

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both taps must be (D,) embeddings; a known training set must hold the positive and nce_k others."""
        for key in ("teacher_tap", "student_tap"):
            embedding_size(context, params, key)
        nce_k = params["nce_k"]
        if 0 < context.train_size < nce_k + 1:
            raise MethodConfigError(
                "nce_k", f"nce_k {nce_k} needs at least {nce_k + 1} training samples (each one's own and nce_k others); "
                         f"the training set has {context.train_size}",
            )
        if params["negatives"] != "other_classes" or context.train_labels is None:
            return  # the planner's preflight knows the training set's size, not its labels
        counts = torch.bincount(torch.as_tensor(context.train_labels), minlength=context.num_classes)
        fewest = context.train_size - int(counts.max())
        if fewest < nce_k:
            raise MethodConfigError(
                "nce_k", f"nce_k {nce_k} negatives from other classes, but the largest class leaves only {fewest} "
                         "training samples of other classes; lower nce_k or use negatives: any_other_sample",
            )

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        assert batch.indices is not None, "crd needs each sample's index into the training set"
        student_features = student.features[self.params["student_tap"]].flatten(1)
        teacher_features = teacher.features[self.params["teacher_tap"]].detach().flatten(1)
        # exp(x / 0.07) magnifies bfloat16's rounding of the dot products, so the contrast runs in float32
        with torch.autocast(student_features.device.type, enabled=False):
            student_embedding = normalise(self.student_embed(student_features.float()))
            teacher_embedding = normalise(self.teacher_embed(teacher_features.float()))
            labels = self.train_labels if self.params["negatives"] == "other_classes" else None
            candidates = negative_candidates(batch.indices, labels, self.context.train_size)
            generator = generator_on(batch.generator, candidates.device)
            rows = draw_contrast_indices(batch.indices, candidates, self.params["nce_k"], generator)
            temperature = self.params["nce_t"]
            student_scores = contrast_scores(student_embedding, self.teacher_bank, rows, temperature)
            teacher_scores = contrast_scores(teacher_embedding, self.student_bank, rows, temperature)
            with torch.no_grad():  # set once, at the first step; a where, not an .item() test: no host sync per step
                first = torch.stack([student_scores.mean(), teacher_scores.mean()]) * self.context.train_size
                self.normalizers.copy_(torch.where(self.normalizers < 0, first, self.normalizers))
            crd = (contrast_loss(student_scores / self.normalizers[0], self.context.train_size)
                   + contrast_loss(teacher_scores / self.normalizers[1], self.context.train_size))
            momentum_update(self.student_bank, batch.indices, student_embedding.detach(), self.params["nce_m"])
            momentum_update(self.teacher_bank, batch.indices, teacher_embedding.detach(), self.params["nce_m"])
        return {
            "ce": self.cross_entropy(student, batch),
            "crd": self.params["weight"] * crd,
        }

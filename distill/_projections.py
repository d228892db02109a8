"""Projections between a student's and a teacher's feature spaces, shared by the feature methods.

``projection`` chooses how a (N, C_s, H, W) student map and a (N, C_t, H, W) teacher map are
brought to one channel space before they are compared. What each kind is follows the released
code of Cooper et al., "Logit-Based Losses Limit the Effectiveness of Feature Knowledge
Distillation" (NeurReps 2025; github.com/Thegolfingocto/KD_wo_CE, Scripts/Arch/Models/Misc.py and
Scripts/FKD.py):

* ``conv1x1``: their SingleLayerConv2D, one 1x1 convolution C_s -> C_t without bias and without
  batch norm, trained with the student.
* ``three_layer_conv``: their ThreeLayerConv2D (taken from SemCKD's models/util.py): 1x1 conv ->
  BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv, 2 x C_t middle channels, convolutions without
  bias, no batch norm after the last one.
* ``pca``: the other direction. The TEACHER map is projected onto the top C_s principal
  components of its own channel vectors (every spatial position of every training image is one
  sample), fitted once by the ``fit_pca`` pre-stage and fixed; the student map is used as it is.
  Their code fits PCA on whole flattened maps instead; per channel vector keeps the fit a C_t x C_t
  eigenproblem that does not depend on the spatial size.
* ``none``: identity, for losses that compare relations rather than the maps themselves; a
  method comparing maps refuses it when C_s != C_t.

The leading underscore keeps this file out of the method registry.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

PROJECTIONS = ("conv1x1", "three_layer_conv", "pca", "none")


class ThreeLayerConv(nn.Sequential):
    """1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv, with 2 x C_t middle channels."""

    def __init__(self, student_channels: int, teacher_channels: int):
        middle = 2 * teacher_channels
        super().__init__(
            nn.Conv2d(student_channels, middle, kernel_size=1, bias=False),
            nn.BatchNorm2d(middle),
            nn.ReLU(),
            nn.Conv2d(middle, middle, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(middle),
            nn.ReLU(),
            nn.Conv2d(middle, teacher_channels, kernel_size=1, bias=False),
        )


class PCAProjection(nn.Module):
    """A teacher map's coordinates on the top ``components`` principal components of its channel
    vectors: ``(x - mean) @ V_k^T`` at every position. The mean and components are buffers, so a
    saved student's method state restores them; until ``load_fit`` they are a placeholder (zero
    mean, the first unit vectors), which is what the planner's preflight builds."""

    def __init__(self, teacher_channels: int, components: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(teacher_channels))
        self.register_buffer("components", torch.eye(teacher_channels)[:components].clone())

    def load_fit(self, fit: Mapping[str, torch.Tensor]) -> None:
        """Take the mean and the leading rows of a ``fit_channel_pca`` result (rows sorted by
        explained variance, descending)."""
        self.mean.copy_(fit["mean"])
        self.components.copy_(fit["components"][: self.components.shape[0]])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - self.mean.to(features.dtype).view(1, -1, 1, 1)
        return torch.einsum("nchw,kc->nkhw", centred, self.components.to(features.dtype))


def projected_side(kind: str) -> str:
    """Which map ``build_projection``'s module is applied to: "teacher" for pca, else "student"."""
    return "teacher" if kind == "pca" else "student"


def projection_problem(kind: str, student_channels: int, teacher_channels: int) -> str | None:
    """Why ``kind`` cannot map these channel counts onto one space for a map-to-map loss, or None."""
    if kind not in PROJECTIONS:
        return f"unknown projection {kind!r}; allowed: {', '.join(PROJECTIONS)}"
    if kind == "none" and student_channels != teacher_channels:
        return (f"projection none compares maps as they are, but the student has {student_channels} channels and "
                f"the teacher {teacher_channels}; allowed: conv1x1, three_layer_conv, pca")
    if kind == "pca" and student_channels > teacher_channels:
        return (f"projection pca keeps the teacher's top {student_channels} principal components, but the teacher has "
                f"only {teacher_channels} channels; allowed here: conv1x1, three_layer_conv")
    return None


def build_projection(kind: str, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """The module that brings a (C_s, H, W) student map and a (C_t, H, W) teacher map to one channel
    space; it applies to the side ``projected_side(kind)`` names. ValueError when it cannot."""
    student_channels, teacher_channels = student_shape[0], teacher_shape[0]
    problem = projection_problem(kind, student_channels, teacher_channels)
    if problem is not None:
        raise ValueError(problem)
    if kind == "conv1x1":
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    if kind == "three_layer_conv":
        return ThreeLayerConv(student_channels, teacher_channels)
    if kind == "pca":
        return PCAProjection(teacher_channels, student_channels)
    return nn.Identity()


class ChannelMoments:
    """Streaming sums over channel vectors, in float64: the count, sum x and sum x x^T. Every spatial
    position of every image in the (N, C, H, W) maps given to ``add`` is one C-dimensional sample."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        vectors = features.detach().double().movedim(1, -1).reshape(-1, features.shape[1])
        if self.total is None:
            self.total = torch.zeros(vectors.shape[1], dtype=torch.float64, device=vectors.device)
            self.outer = torch.zeros(vectors.shape[1], vectors.shape[1], dtype=torch.float64, device=vectors.device)
        self.count += vectors.shape[0]
        self.total += vectors.sum(0)
        self.outer += vectors.T @ vectors

    def pca(self) -> dict[str, torch.Tensor]:
        """mean (C,), components (C, C) as rows sorted by explained variance descending, each signed so
        that its largest-magnitude entry is positive (a reproducible basis), and explained_variance (C,)
        (the unbiased covariance's eigenvalues, as scikit-learn reports them). On the CPU, float64."""
        if self.total is None or self.count < 2:
            raise ValueError("PCA needs at least two channel vectors")
        mean = self.total / self.count
        covariance = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        order = torch.argsort(eigenvalues, descending=True)
        components = eigenvectors[:, order].T
        largest = components.gather(1, components.abs().argmax(1, keepdim=True))
        components = components * torch.sign(largest)
        return {
            "mean": mean.cpu(),
            "components": components.cpu(),
            "explained_variance": eigenvalues[order].clamp(min=0.0).cpu(),
        }


def fit_channel_pca(maps: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """PCA of the channel vectors of a stream of (N, C, H, W) maps (see ``ChannelMoments.pca``)."""
    moments = ChannelMoments()
    for features in maps:
        moments.add(features)
    return moments.pca()

"""Tucker-decomposition distillation: the student's feature map is trained so that its Tucker core,
normalised per sample, matches the teacher's.

A Tucker decomposition X = G x1 U_c x2 U_h x3 U_w (orthonormal factors U, found by higher-order
orthogonal iteration) packs a feature map's channel and spatial structure into a small core G of
shape (rc, rh, rw). Cores of any tensor sizes are comparable once the ranks are fixed, so teacher
and student may differ in spatial size; a channel-count mismatch is bridged by a learned 1x1
projection of the student's map to the teacher's channel count.

Two modes:

* ``full``: one partial Tucker decomposition of the batch (N, C, H, W) over modes 1, 2, 3 only. The
  factors are shared by the batch; the batch mode keeps no factor, so each sample keeps its own
  core slice (a rank on the batch mode would mix samples) and other samples reach it only through
  the shared factors.
* ``samplewise``: one Tucker decomposition of (C, H, W) per sample, each with its own factors.

Factors come from SVDs, which fix them only up to the sign of each column; ``fix_signs`` makes the
choice deterministic so that the two sides' cores are comparable at all.

Gradient path: the student's factors are computed without grad and its core is then the projection
G = X x1 U_c^T x2 U_h^T x3 U_w^T, linear in X. Differentiating through the SVD instead would divide
by gaps between singular values, which blow up when two of them are nearly equal (common in small,
early-training feature maps). Treating the factors as constants gives a stable gradient that moves
the student's map along the subspaces it already spans.
"""
from __future__ import annotations

from typing import Any, Mapping

import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import partial_tucker
from torch import nn

from distill._feature_maps import feature_map_shape
from distill.base import Batch, Method, MethodConfigError, MethodContext, ModelOutput, register_method

METHOD = {
    "name": "tucker",
    "summary": "L1 between per-sample normalised Tucker cores of teacher and student feature maps (tensorly, HOOI)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "layer3", "tap": "teacher", "help": "teacher feature map to decompose"},
        "student_tap": {"default": "layer3", "tap": "student", "help": "student feature map to decompose"},
        "mode": {"default": "full", "choices": ["full", "samplewise"], "help": "one decomposition of the batch, or one per sample"},
        "ranks": {"default": [4, 2, 2], "length": 3, "min": 1, "help": "core size [channel, height, width]; each at most the tap's size on both sides (samplewise: and at most the product of the other two sizes)"},
        "n_iter_max": {"default": 2, "min": 0, "help": "HOOI iterations after the SVD initialisation (0 = truncated HOSVD)"},
        "weight": {"default": 10.0, "min": 0.0, "help": "Tucker term = weight x mean |normalised student core - normalised teacher core|"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}

_MODES = (1, 2, 3)  # channel, height, width of an (N, C, H, W) batch; the batch mode 0 is never decomposed


def fix_signs(core: torch.Tensor, factors: list[torch.Tensor], modes: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Resolve the sign ambiguity of a Tucker decomposition.

    Flipping column j of the factor of mode m together with slice j of the core along mode m leaves
    the decomposed tensor unchanged, so an SVD may return either. The rule: in every factor column
    the entry of largest magnitude is made positive (the first such entry on ties), and the core's
    matching slice is flipped with it. Equivalent decompositions then give the same core.
    """
    fixed_factors = []
    for factor, mode in zip(factors, modes):
        largest = factor.gather(0, factor.abs().argmax(dim=0, keepdim=True))
        signs = torch.where(largest < 0, -1.0, 1.0).to(factor.dtype)  # (1, rank)
        fixed_factors.append(factor * signs)
        shape = [1] * core.dim()
        shape[mode] = signs.numel()
        core = core * signs.reshape(shape)
    return core, fixed_factors


def tucker_cores(features: torch.Tensor, ranks: list[int], n_iter_max: int) -> torch.Tensor:
    """Sign-fixed cores (N, rc, rh, rw) of one partial Tucker decomposition of (N, C, H, W) over modes 1-3.

    The factors never carry grad; if ``features`` does, the returned core is its differentiable
    projection onto them (see the module docstring).
    """
    # Whole computation in float32 with autocast off: SVD has no half-precision kernels, and the
    # student's core (the einsum) must be as exact as the teacher's it is compared with.
    features = features.float()
    with torch.autocast(features.device.type, enabled=False):
        with torch.no_grad(), tl.backend_context("pytorch", local_threadsafe=True):
            (core, factors), _ = partial_tucker(
                features.detach(), rank=list(ranks), modes=list(_MODES), n_iter_max=n_iter_max, random_state=0
            )
            core, factors = fix_signs(core, factors, _MODES)
        if not (features.requires_grad and torch.is_grad_enabled()):
            return core
        return torch.einsum("nchw,ci,hj,wk->nijk", features, *factors)


def samplewise_tucker_cores(features: torch.Tensor, ranks: list[int], n_iter_max: int) -> torch.Tensor:
    """Cores (N, rc, rh, rw) of one Tucker decomposition of (C, H, W) per sample, each with its own factors."""
    return torch.cat([tucker_cores(sample, ranks, n_iter_max) for sample in features.split(1)])


@register_method
class Tucker(Method):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
        self.check(self.params, context)
        teacher_channels = context.teacher_tap_shapes[self.params["teacher_tap"]][0]
        student_channels = context.student_tap_shapes[self.params["student_tap"]][0]
        self.projection = (
            nn.Identity() if student_channels == teacher_channels
            else nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        )

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Each rank must fit its mode on both sides; one sample's mode-k unfolding also caps it at the
        product of the other two sizes (a (256, 2, 2) sample has channel rank at most 4), so samplewise
        mode checks that too rather than pad the core with slices that are zero on both sides."""
        ranks = list(params["ranks"])
        for key in ("teacher_tap", "student_tap"):
            shape = feature_map_shape(context, params, key)
            volume = shape[0] * shape[1] * shape[2]
            limits = list(shape) if params["mode"] == "full" else [min(size, volume // size) for size in shape]
            if any(rank > limit for rank, limit in zip(ranks, limits)):
                side = key.split("_", 1)[0]
                raise MethodConfigError(
                    "ranks",
                    f"{ranks} exceed the {side} tap {params[key]!r} of (C, H, W) = {shape}, "
                    f"which allows at most {limits} in {params['mode']} mode",
                )

    @property
    def teacher_taps(self) -> tuple[str, ...]:
        return (self.params["teacher_tap"],)

    @property
    def student_taps(self) -> tuple[str, ...]:
        return (self.params["student_tap"],)

    def cores(self, features: torch.Tensor) -> torch.Tensor:
        """Per-sample Tucker cores in this method's mode, each scaled to unit Frobenius norm, flattened."""
        decompose = tucker_cores if self.params["mode"] == "full" else samplewise_tucker_cores
        core = decompose(features, self.params["ranks"], self.params["n_iter_max"])
        return F.normalize(core.flatten(1), p=2, dim=1)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        with torch.no_grad():
            teacher_core = self.cores(teacher.features[self.params["teacher_tap"]])
        student_core = self.cores(self.projection(student.features[self.params["student_tap"]]))
        return {
            "ce": self.params["ce_weight"] * F.cross_entropy(student.logits, batch.labels),
            "tucker": self.params["weight"] * F.l1_loss(student_core, teacher_core),
        }

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

Both sides' cores are the same projection G = X x1 U_c^T x2 U_h^T x3 U_w^T of the map onto its own
factors (tensorly's returned core is not used), so a student equal to the teacher scores exactly 0.

Signs. An SVD fixes each factor column only up to sign: negating it together with the matching
core slice leaves X unchanged. A spatial column is a pattern over pixel positions, which means the
same thing in both networks, so its sign is made canonical on each side (``fix_signs``: largest-
magnitude entry positive). A channel column is a mix of channels, whose basis is private to each
network: a student map that is the teacher's with its channels rotated, X x1 Q with Q orthogonal
(a change of basis the 1x1 projection could undo), has the channel factor Q U_c and the teacher's
core up to the sign of each channel slice, and a rule read off Q U_c picks those signs at random
(the rotated copy in tests/test_distill.py scores 1.80 at the default weight 10 when channel signs
follow the factor rule, 3e-14 here). So the loss settles the channel signs (``aligned_l1``): each
channel slice of the student's core is compared with the teacher's as it is or negated, whichever
is closer, i.e. the term is the minimum over all channel sign choices. That is exactly invariant
to the channel basis and, unlike a canonical rule read off one side's core, continuous: it does
not jump when two entries of a slice swap which one is largest.

Gradient path: the factors are computed without grad and the core is then the projection above,
linear in X (the chosen signs are constants too). Differentiating through the SVD instead would
divide by gaps between singular values, which blow up when two of them are nearly equal (common in
small, early-training feature maps). Treating the factors as constants gives a stable gradient
that moves the student's map along the subspaces it already spans.
"""
from __future__ import annotations

from typing import Any, Mapping

import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import partial_tucker
from torch import nn

from distill._feature_maps import feature_map_shape
from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, TapPairMethod, register_method

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
        "weight": {"default": 10.0, "min": 0.0, "help": "Tucker term = weight x mean |normalised student core - normalised teacher core|, each channel slice of the student's taken as is or negated, whichever is closer"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": None,
}

_MODES = (1, 2, 3)  # channel, height, width of an (N, C, H, W) batch; the batch mode 0 is never decomposed


def fix_signs(factor: torch.Tensor) -> torch.Tensor:
    """``factor`` with each column negated where needed so that its largest-magnitude entry (the first
    on ties) is positive: the canonical sign of a spatial factor."""
    largest = factor.gather(0, factor.abs().argmax(dim=0, keepdim=True))
    return factor * torch.where(largest < 0, -1.0, 1.0).to(factor.dtype)


def tucker_cores(features: torch.Tensor, ranks: list[int], n_iter_max: int) -> torch.Tensor:
    """Cores (N, rc, rh, rw) of one partial Tucker decomposition of (N, C, H, W) over modes 1-3: the
    projection of ``features`` onto the factors, spatial signs fixed, channel signs as the SVD gives.

    The factors never carry grad; if ``features`` does, so does the core (see the module docstring).
    """
    # Float32 at least (float64 stays) with autocast off: SVD has no half-precision kernels.
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    with torch.autocast(features.device.type, enabled=False):
        with torch.no_grad(), tl.backend_context("pytorch", local_threadsafe=True):
            (_, (channel, height, width)), _ = partial_tucker(
                features.detach(), rank=list(ranks), modes=list(_MODES), n_iter_max=n_iter_max, random_state=0
            )
        return torch.einsum("nchw,ci,hj,wk->nijk", features, channel, fix_signs(height), fix_signs(width))


def samplewise_tucker_cores(features: torch.Tensor, ranks: list[int], n_iter_max: int) -> torch.Tensor:
    """Cores (N, rc, rh, rw) of one Tucker decomposition of (C, H, W) per sample, each with its own factors."""
    return torch.cat([tucker_cores(sample, ranks, n_iter_max) for sample in features.split(1)])


def aligned_l1(student_core: torch.Tensor, teacher_core: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Mean |s x student - teacher| over all entries of two (N, rc, rh, rw) cores, where s negates the
    channel slices that are closer to the teacher's negated.

    The channel factor is shared by the batch unless ``per_sample`` (samplewise mode), so a slice is
    the batch's (rh, rw) entries of one channel column, or one sample's.
    """
    dims = (2, 3) if per_sample else (0, 2, 3)
    as_is = (student_core - teacher_core).abs().sum(dim=dims)
    negated = (student_core + teacher_core).abs().sum(dim=dims)
    return torch.minimum(as_is, negated).sum() / student_core.numel()


@register_method
class Tucker(TapPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        super().__init__(params, context)
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

    def cores(self, features: torch.Tensor) -> torch.Tensor:
        """Tucker cores (N, rc, rh, rw) in this method's mode, each sample's scaled to unit Frobenius norm."""
        decompose = tucker_cores if self.params["mode"] == "full" else samplewise_tucker_cores
        core = decompose(features, self.params["ranks"], self.params["n_iter_max"])
        return F.normalize(core.flatten(1), p=2, dim=1).view_as(core)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        with torch.no_grad():
            teacher_core = self.cores(teacher.features[self.params["teacher_tap"]])
        student_core = self.cores(self.projection(student.features[self.params["student_tap"]]))
        return {
            "ce": self.cross_entropy(student, batch),
            "tucker": self.params["weight"] * aligned_l1(student_core, teacher_core, self.params["mode"] == "samplewise"),
        }

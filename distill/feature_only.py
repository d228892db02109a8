"""Feature-only distillation (Cooper, Chen, Dwivedy & Gurari, "Logit-Based Losses Limit the
Effectiveness of Feature Knowledge Distillation", NeurReps 2025).

The student's backbone up to its last distilled layer is trained by feature losses alone: that
layer's output reaches the rest of the network detached (``detached_student_tap``), so the
cross-entropy trains only the layers above it and the classifier. The feature term is the mean
over tap pairs of the mean squared error between the two maps once ``projection`` has brought
them to one channel space (``distill/_projections.py``), the larger map first average-pooled to
the smaller's spatial size. ``detach_head: false`` lets the cross-entropy reach the whole student
(the paper's "+CE" runs); ``kd_weight`` above 0 adds a KD term on the logits (its "+LL" / "+VKD"
runs use 16 at T 4).

What we follow is the authors' released code (github.com/Thegolfingocto/KD_wo_CE):

* Scripts/Trainer.py ``Train``: with SeperateLinear the classifier sees the last distilled
  layer's output detached; the total is CELossWeight x CE + LGLossWeight x KL + LSLossWeight x
  (sum of per-layer losses / number of layers); the main runs (ExperimentConfigs/MainExperiments,
  e.g. ResNet34->ResNet9/SingleLayerConv/OursMulti.json) set CELossWeight 1, LSLossWeight 1,
  ProjectorArchitecture SingleLayerConv (``projection: conv1x1``), and the +VKD runs LGLossWeight
  16 at Temperature 4.
* Scripts/FKD.py ``ComputeProjLoss`` / ``FKDProjector2D``: per layer pair, the MSE over the batch
  and every entry of the projected student map and the teacher map, the larger map pooled with
  adaptive_avg_pool2d to the smaller before the projection. Their pooling needs one map larger in
  both H and W; here each side is pooled to the smaller height and the smaller width.
* Scripts/Arch/Models/Misc.py ``KLDiv``: the KL term is the batch mean of the per-sample KL at
  temperature T, with no T^2 factor ("handled explicitly elsewhere": the weight 16 at T 4 is it),
  so ``kd`` here is ``kd_weight x KL`` without T^2.
* Their training recipe (AdamW, one-cycle to lr 0.0075, batch 128, 50 epochs, no augmentation)
  belongs to the sweep's ``student`` section, not to this method.

With ``projection: pca`` the teacher's maps are projected onto the top C_s principal components
of their channel vectors, fitted on the training split by the ``fit_pca`` pre-stage, and read
from ``<pre_stage_dir>/final.pt``. Without a pre_stage_dir (the planner's preflight, a student
rebuilt from its final.pt) the projection holds placeholders that a saved state restores.

``student_taps`` are listed in the order the student runs them: the last one is the layer whose
output is detached, so it must be the deepest. The method cannot check that order from tap
shapes alone; a tap listed after the detached one but lying above it is trained by both its
feature term and the cross-entropy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distill._feature_maps import map_pairs
from distill._projections import build_projection, projected_side, projection_problem
from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, TapListPairMethod, register_method

METHOD = {
    "name": "feature_only",
    "summary": "feature losses alone train the student's backbone; its last distilled layer is detached below the classifier (Cooper et al., NeurReps 2025)",
    "uses_teacher": True,
    "teacher_outputs_only": True,
    "params": {
        "teacher_taps": {"default": ["layer1", "layer2", "layer3"], "tap": "teacher", "help": "teacher feature maps, paired in order with student_taps"},
        "student_taps": {"default": ["layer1", "layer2", "layer3"], "tap": "student", "help": "student feature maps in the order the student runs them; the last one's output is detached when detach_head is true"},
        "projection": {"default": "conv1x1", "choices": ["conv1x1", "three_layer_conv", "pca", "none"], "help": "conv1x1: learned 1x1 conv student->teacher channels; three_layer_conv: 1x1-BN-ReLU-3x3-BN-ReLU-1x1 with 2 C_t middle channels; pca: teacher projected onto its top C_s principal components (fit_pca pre-stage); none: maps compared as they are"},
        "detach_head": {"default": True, "help": "the rest of the student sees the last student tap detached, so only feature terms train the layers below it (false: the paper's +CE variant)"},
        "feature_weight": {"default": 1.0, "min": 0.0, "help": "feature term = feature_weight x mean over tap pairs of the MSE between the projected maps"},
        "kd_weight": {"default": 0.0, "min": 0.0, "help": "weight of KL(softmax(t/T) || softmax(s/T)), batch mean, no T^2 factor (the paper's +LL variant: 16 at T 4)"},
        "temperature": {"default": 4.0, "min": 0.01, "help": "softmax temperature T of the KD term"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": {"kind": "fit_pca", "params": ["teacher_taps"], "when": {"projection": "pca"}},
}

# What the fit_pca pre-stage writes into its weights folder: {"taps": {tap: {"mean", "components", ...}}}.
PCA_FILE = "final.pt"


def pooled_to_common_size(student_map: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller height and the smaller width, the larger one average-pooled."""
    size = (min(student_map.shape[2], teacher_map.shape[2]), min(student_map.shape[3], teacher_map.shape[3]))
    if tuple(student_map.shape[2:]) != size:
        student_map = F.adaptive_avg_pool2d(student_map, size)
    if tuple(teacher_map.shape[2:]) != size:
        teacher_map = F.adaptive_avg_pool2d(teacher_map, size)
    return student_map, teacher_map


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), summed over classes and averaged over the batch; no T^2."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
        log_target=True, reduction="batchmean",
    )


@register_method
class FeatureOnly(TapListPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        """One projection per tap pair; with pca, their fits from the pre-stage when it ran."""
        super().__init__(params, context)
        kind = self.params["projection"]
        pairs = list(zip(self.params["teacher_taps"], self.params["student_taps"]))
        self.projections = nn.ModuleList(
            build_projection(kind, context.student_tap_shapes[s_tap], context.teacher_tap_shapes[t_tap])
            for t_tap, s_tap in pairs
        )
        if kind == "pca" and context.pre_stage_dir is not None:
            fits = torch.load(Path(context.pre_stage_dir) / PCA_FILE, map_location="cpu", weights_only=True)["taps"]
            for projection, (t_tap, _) in zip(self.projections, pairs):
                projection.load_fit(fits[t_tap])

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        """Both lists name (C, H, W) maps and pair up one to one, and the projection fits every pair."""
        for (teacher_shape, student_shape), t_tap, s_tap in zip(map_pairs(context, params), params["teacher_taps"], params["student_taps"]):
            problem = projection_problem(params["projection"], student_shape[0], teacher_shape[0])
            if problem is not None:
                raise MethodConfigError("projection", f"tap pair {t_tap!r} / {s_tap!r}: {problem}")

    @property
    def detached_student_tap(self) -> str | None:
        return self.params["student_taps"][-1] if self.params["detach_head"] else None

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> torch.Tensor:
        """Mean over tap pairs of the MSE (mean over batch and entries) between the projected maps."""
        side = projected_side(self.params["projection"])
        errors = []
        for projection, t_tap, s_tap in zip(self.projections, self.params["teacher_taps"], self.params["student_taps"]):
            student_map, teacher_map = pooled_to_common_size(student.features[s_tap], teacher.features[t_tap].detach())
            if side == "student":
                student_map = projection(student_map)
            else:
                with torch.no_grad():
                    teacher_map = projection(teacher_map)
            errors.append(F.mse_loss(student_map, teacher_map))
        return torch.stack(errors).mean()

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        terms = {
            "ce": self.cross_entropy(student, batch),
            "feature": self.params["feature_weight"] * self.feature_term(student, teacher),
        }
        if self.params["kd_weight"] > 0:
            terms["kd"] = self.params["kd_weight"] * soft_kl(student.logits, teacher.logits.detach(), self.params["temperature"])
        return terms

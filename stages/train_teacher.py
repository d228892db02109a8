"""Stage 1: train a teacher with cross-entropy; students and paraphrasers read its weights.

A teacher may start from imported weights (``init``) and fine-tune them, its backbone at a fraction
of the lr (``backbone_lr_scale``), or train 0 epochs: its final.pt is then the imported network as
it is, and the evaluate stage scores it like any other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.context import StageRun
from stages.loading import load_stage_data, model_state, new_classifier
from stages.training import EpochLoop, TrainingSettings, backbone_lr_scales, training_outputs


def run(stage: StageRun) -> None:
    spec = stage.spec
    training = spec.settings["training"]
    settings = TrainingSettings.from_settings(training, seed=training["seed"])
    data = load_stage_data(spec, stage.upstream, stage.device)
    torch.manual_seed(settings.seed)
    model, imported = new_classifier(spec.settings["arch"], data, training.get("init"))
    model = stage.prepare(model, "teacher")
    label_smoothing = float(training["label_smoothing"])

    def compute_terms(
        images: torch.Tensor, labels: torch.Tensor, epoch: int, indices: torch.Tensor, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        logits = model(images)
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}, logits

    log = EpochLoop(
        stage=stage,
        record={**stage.record(settings.seed), "initial_weights": imported},
        modules=nn.ModuleDict({"model": model}),
        compute_terms=compute_terms,
        data=data,
        settings=settings,
        classifier=model,
        saved_state=lambda: model_state(spec.settings["arch"], data, model),
        lr_scales=backbone_lr_scales("model", training.get("backbone_lr_scale", 1.0)),
    ).run()
    stage.finish(log, training_outputs(stage.folders), plots=True)

"""Stage 1: train a teacher with cross-entropy; students and paraphrasers read its weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.context import StageRun
from stages.loading import load_stage_data, model_state, new_classifier
from stages.training import EpochLoop, TrainingSettings, training_outputs


def run(stage: StageRun) -> None:
    spec, device = stage.spec, stage.device
    training = spec.settings["training"]
    settings = TrainingSettings.from_settings(training, seed=training["seed"])
    data = load_stage_data(spec)
    torch.manual_seed(settings.seed)
    model = new_classifier(spec.settings["arch"], data).to(device)
    label_smoothing = float(training["label_smoothing"])

    def compute_terms(
        images: torch.Tensor, labels: torch.Tensor, epoch: int, indices: torch.Tensor, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        logits = model(images)
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}, logits

    log = EpochLoop(
        stage=stage,
        record=stage.record(settings.seed),
        modules=nn.ModuleDict({"model": model}),
        compute_terms=compute_terms,
        data=data,
        settings=settings,
        classifier=model,
        saved_state=lambda: model_state(spec.settings["arch"], data, model),
    ).run()
    stage.finish(log, training_outputs(stage.folders), plots=True)

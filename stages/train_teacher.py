"""Stage 1: train a teacher with cross-entropy; students and paraphrasers read its weights."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.plan import StageSpec
from stages.files import begin_stage, finish_stage, run_record, select_device, use_amp
from stages.loading import load_stage_data, model_state, new_classifier
from stages.training import EpochLoop, TrainingSettings


def run(spec: StageSpec, root: Path) -> None:
    folders = begin_stage(spec, root)
    training = spec.settings["training"]
    settings = TrainingSettings.from_settings(training, seed=training["seed"])
    device = select_device(spec.runtime.get("device", "auto"))
    data = load_stage_data(spec)
    torch.manual_seed(settings.seed)
    model = new_classifier(spec.settings["arch"], data).to(device)
    label_smoothing = float(training["label_smoothing"])

    def compute_terms(images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        logits = model(images)
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}, logits

    log = EpochLoop(
        folders=folders,
        record=run_record(spec, device, settings.seed),
        modules=nn.ModuleDict({"model": model}),
        compute_terms=compute_terms,
        data=data,
        settings=settings,
        device=device,
        classifier=model,
        saved_state=lambda: model_state(spec.settings["arch"], data, model),
        amp=use_amp(spec, device),
    ).run()
    finish_stage(folders, log)

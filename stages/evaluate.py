"""Stage 4: score a trained model on the test split, at its last epoch and its best-on-validation epoch.

The best epoch was chosen by the training stage on the held-out validation split only; the test
split is read here for reporting, never for choosing. Agreement is the share of test images on
which the model predicts the same class as the reference teacher. The models run under the
evaluate section's runtime switches, as training runs under its own.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import parameter_count
from pipeline.logfiles import read_log
from pipeline.store import write_json
from stages.context import StageRun
from stages.loading import load_classifier, load_stage_data
from stages.training import accuracy, predict


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    return 100.0 * hits.float().mean().item()


def scores(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None) -> dict[str, Any]:
    return {
        "top1": accuracy(logits, labels),
        "top5": top_k_accuracy(logits, labels, 5),
        "test_loss": F.cross_entropy(logits, labels).item(),
        "agreement": None if reference is None else 100.0 * (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
    }


def run(stage: StageRun) -> None:
    spec, device, upstream, folders = stage.spec, stage.device, stage.upstream, stage.folders
    data = load_stage_data(spec, stage.upstream)
    batch_size = int(spec.settings["batch_size"])
    model_folders = upstream["model"]

    def test_logits(model: nn.Module, role: str) -> torch.Tensor:
        stage.prepare(model, role)
        return predict(model, data.split_images("test", batch_size), device, data.normalise, stage.switches)

    trained = load_classifier(model_folders.final_weights, device)
    reference = None
    if "teacher" in upstream:
        reference = test_logits(load_classifier(upstream["teacher"].final_weights, device).model, "teacher")

    last = scores(test_logits(trained.model, "model"), data.test_labels, reference)
    best_epoch = read_log(model_folders.logs).get("best_epoch")
    if model_folders.best_weights.is_file():
        best_model = load_classifier(model_folders.best_weights, device).model
        best = scores(test_logits(best_model, "best model"), data.test_labels, reference)
    else:  # no validation split (val_fraction 0): there is no best epoch to report, not the last one
        best = {name: None for name in last}
    result = {
        "model_stage": model_folders.name,
        "arch": trained.arch,
        "best_epoch": best_epoch,
        "parameters": parameter_count(trained.model),
        "test_images": len(data.test_labels),
        "teacher_top1": None if reference is None else accuracy(reference, data.test_labels),
        **{f"{name}_last": value for name, value in last.items()},
        **{f"{name}_best_val": value for name, value in best.items()},
    }
    write_json(folders.result, result)
    log = dict(stage.record(seed=None), epochs=[], best_epoch=best_epoch, status="done", result=result)
    stage.finish(log, [folders.result], plots=False)

"""Stage 2 (Factor Transfer only): train the paraphraser as an autoencoder of one teacher feature map.

The teacher is frozen; only the paraphraser learns, with the method's own reconstruction loss.
Students of every FT run that shares this teacher and these paraphraser settings read the
result from ``weights/<this stage>/final.pt``.
"""
from __future__ import annotations


import torch
from torch import nn

from distill import ft
from models.registry import tap_shapes
from models.taps import FeatureTaps
from stages.context import StageRun
from stages.loading import load_classifier, load_stage_data
from stages.training import EpochLoop, TrainingSettings, training_outputs

# Optimiser settings the paraphraser shares with CIFAR training; its epochs, learning rate and
# batch size are FT params (they are in the stage hash), these are not meant to be swept. The
# schedule is cosine without warm-up, so the step schedule's milestones and gamma and onecycle's
# pct_start are unused; the optimiser is sgd, so betas are too.
PARAPHRASER_TRAINING = {
    "optimizer": "sgd", "momentum": 0.9, "nesterov": False, "betas": None, "weight_decay": 5e-4,
    "lr_schedule": "cosine", "warmup_epochs": 0, "pct_start": 0.3, "milestones": None, "gamma": 0.1, "augment": True,
}
PARAPHRASER_SEED = 0


def run(stage: StageRun) -> None:
    spec, device, upstream = stage.spec, stage.device, stage.upstream
    params = spec.settings["method"]["params"]
    settings = TrainingSettings.from_settings(
        {**PARAPHRASER_TRAINING, "epochs": params["paraphraser_epochs"], "lr": params["paraphraser_lr"],
         "batch_size": params["paraphraser_batch_size"]},
        seed=PARAPHRASER_SEED,
    )
    data = load_stage_data(spec, stage.upstream, stage.device)
    teacher = load_classifier(upstream["teacher"].final_weights, device)
    stage.prepare(teacher.model, "teacher")
    tap = params["teacher_tap"]
    tap_shape = tap_shapes(teacher.arch, tuple(data.image_shape), data.num_classes)[tap]
    torch.manual_seed(PARAPHRASER_SEED)
    paraphraser = stage.prepare(ft.build_paraphraser(tap_shape, params), "paraphraser")
    teacher_taps = FeatureTaps(teacher.model, [tap])

    def compute_terms(
        images: torch.Tensor, labels: torch.Tensor, epoch: int, indices: torch.Tensor, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], None]:
        with torch.no_grad():
            features = teacher_taps(images)[1][tap]
        reconstruction = paraphraser(features)
        return {"reconstruction": ft.reconstruction_loss(reconstruction, features, params["recon_loss"])}, None

    log = EpochLoop(
        stage=stage,
        record=stage.record(PARAPHRASER_SEED),
        modules=nn.ModuleDict({"paraphraser": paraphraser}),
        compute_terms=compute_terms,
        data=data,
        settings=settings,
        classifier=None,
        saved_state=lambda: {"paraphraser": paraphraser.state_dict(), "teacher_tap": tap, "tap_shape": tap_shape},
    ).run()
    stage.finish(log, training_outputs(stage.folders), plots=True)

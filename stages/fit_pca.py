"""Pre-stage of ``projection: pca`` feature methods: fit PCA on the teacher's channel vectors.

The frozen teacher runs over the training split once (no augmentation: the fit describes the
features as they are), and for each teacher tap every spatial position of every image is one
C_t-dimensional sample of a streaming covariance (``distill._projections.ChannelMoments``). All
C_t components are saved, sorted by explained variance, so that the fit does not depend on the
student: each student slices its own top C_s. Every student of this teacher and these taps reads
``weights/<this stage>/final.pt`` = ``{"taps": {tap: {"mean", "components", "explained_variance"}}}``.
"""
from __future__ import annotations

import torch

from distill._projections import ChannelMoments
from models.taps import FeatureTaps
from stages.context import StageRun
from stages.files import save_torch
from stages.loading import load_classifier, load_stage_data

# Images per teacher forward pass; it changes neither the sums nor the fit, only memory and speed.
FIT_BATCH_SIZE = 256


def run(stage: StageRun) -> None:
    spec, device = stage.spec, stage.device
    taps = list(dict.fromkeys(spec.settings["method"]["params"]["teacher_taps"]))
    data = load_stage_data(spec, stage.upstream)
    teacher = load_classifier(stage.upstream["teacher"].final_weights, device)
    tapped = FeatureTaps(teacher.model, taps)
    moments = {tap: ChannelMoments() for tap in taps}
    with torch.no_grad():
        for images in data.split_images("train", FIT_BATCH_SIZE):
            _, features = tapped(data.normalise(images.to(device)))
            for tap in taps:
                moments[tap].add(features[tap])
    fits = {tap: moments[tap].pca() for tap in taps}
    save_torch(stage.folders.final_weights, {"taps": fits})
    ratios = {
        tap: (fit["explained_variance"] / fit["explained_variance"].sum().clamp(min=1e-300)).tolist()
        for tap, fit in fits.items()
    }
    log = dict(stage.record(seed=None), epochs=[], best_epoch=None, status="done", explained_variance_ratio=ratios)
    stage.finish(log, [stage.folders.final_weights], plots=False)

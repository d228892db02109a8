"""The epoch loop every training stage shares: batches, optimiser, checkpoint/resume, logging.

A stage hands the loop its trainable modules and a ``compute_terms`` function that turns a batch
into named loss terms; the loop owns everything else, so teacher, paraphraser and student training
cannot drift apart. Resumability rests on two choices:

* the checkpoint (written atomically after every epoch) holds the modules, the optimiser, the log
  so far and the best-on-validation state, so a killed job restarts at the next epoch;
* the batch order and augmentation of epoch ``e`` come from a generator seeded by (seed, e), not
  from a generator carried across epochs, so a resumed epoch sees exactly the batches it would have.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm import tqdm

from data.registry import DatasetSplits
from pipeline.store import StageFolders
from stages.context import StageRun
from stages.files import StageError, load_torch, save_torch, write_stage_log

ComputeTerms = Callable[[torch.Tensor, torch.Tensor, int], tuple[dict[str, torch.Tensor], torch.Tensor | None]]
"""(images, labels, 0-based epoch) -> (named loss terms, logits or None when the stage has no classifier)."""


@dataclass(frozen=True)
class TrainingSettings:
    """``milestones`` and ``gamma`` shape the step schedule only; ``milestones`` None means the recipe's."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    milestones: tuple[int, ...] | None
    gamma: float
    augment: bool
    seed: int

    @classmethod
    def from_settings(cls, training: Mapping[str, Any], seed: int) -> "TrainingSettings":
        milestones = training["milestones"]
        return cls(
            epochs=int(training["epochs"]),
            batch_size=int(training["batch_size"]),
            lr=float(training["lr"]),
            momentum=float(training["momentum"]),
            weight_decay=float(training["weight_decay"]),
            lr_schedule=str(training["lr_schedule"]),
            milestones=None if milestones is None else tuple(int(milestone) for milestone in milestones),
            gamma=float(training["gamma"]),
            augment=bool(training["augment"]),
            seed=int(seed),
        )

    @property
    def step_milestones(self) -> tuple[int, ...]:
        """The step schedule's milestones in epochs: the lr is multiplied by ``gamma`` once per milestone
        m <= the 0-based epoch, i.e. a drop comes after m epochs.

        That is how the CRD recipe counts (RepDistiller's train_teacher.py / train_student.py,
        ``--lr_decay_epochs 150,180,210 --lr_decay_rate 0.1`` of 240 epochs, applied by
        helper/util.py's adjust_learning_rate as gamma^(number of milestones < the 1-based epoch)):
        0-based epochs 0-149 train at lr, 150-179 at lr/10, 180-209 at lr/100, 210-239 at lr/1000.
        Without explicit milestones the recipe's are scaled to ``epochs`` as m x epochs / 240
        rounded to the nearest epoch, halves up (30 epochs: 18.75, 22.5, 26.25 -> 19, 23, 26). The
        scaled milestones always lie in 1..epochs; below 7 epochs some coincide, and coinciding
        drops apply together.
        """
        if self.milestones is not None:
            return self.milestones
        recipe_epochs, recipe_milestones = 240, (150, 180, 210)
        return tuple((2 * milestone * self.epochs + recipe_epochs) // (2 * recipe_epochs) for milestone in recipe_milestones)


def learning_rate(settings: TrainingSettings, epoch: int) -> float:
    """Learning rate for 0-based ``epoch``; a pure function, so resuming needs no scheduler state."""
    if settings.lr_schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / settings.epochs))
    if settings.lr_schedule == "step":
        drops = sum(epoch >= milestone for milestone in settings.step_milestones)
        return settings.lr * settings.gamma**drops
    if settings.lr_schedule == "constant":
        return settings.lr
    raise ValueError(f"unknown lr_schedule {settings.lr_schedule!r}; allowed: cosine, step, constant")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def training_batches(
    data: DatasetSplits, settings: TrainingSettings, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented training batches of one epoch, drawn from the in-memory tensors."""
    generator = epoch_generator(settings.seed, epoch)
    order = torch.randperm(len(data.train_labels), generator=generator)
    for start in range(0, len(order), settings.batch_size):
        index = order[start : start + settings.batch_size]
        images = data.train_images[index]
        if settings.augment:
            images = data.augment(images, generator)
        yield images, data.train_labels[index]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits of ``model`` on ``images`` in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    outputs = [model(images[start : start + batch_size].to(device)).float().cpu() for start in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    if len(labels) == 0:
        return None
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


class NonFiniteLossError(StageError):
    """A loss term became NaN or infinite; training stops at once instead of wasting the job."""


@dataclass
class EpochLoop:
    """Trains ``modules`` for ``settings.epochs`` epochs and leaves final weights and a log.

    ``classifier`` (if any) is the module whose val accuracy picks the best epoch and whose
    train/val/test accuracy is logged. ``saved_state`` returns what final.pt / best.pt hold.
    The stage's ``amp`` runs the forward passes under bfloat16 autocast (CUDA only; bfloat16 needs
    no loss scaler, so the optimiser step and the checkpoint stay exactly as without it). Every
    epoch starts by refreshing the stage's lease, so a runner that lost it writes nothing more.
    """

    stage: StageRun
    record: dict[str, Any]
    modules: nn.ModuleDict
    compute_terms: ComputeTerms
    data: DatasetSplits
    settings: TrainingSettings
    classifier: nn.Module | None
    saved_state: Callable[[], dict[str, Any]]

    @property
    def folders(self) -> StageFolders:
        return self.stage.folders

    @property
    def device(self) -> torch.device:
        return self.stage.device

    def run(self) -> dict[str, Any]:
        parameters = [parameter for parameter in self.modules.parameters() if parameter.requires_grad]
        optimizer = torch.optim.SGD(
            parameters, lr=self.settings.lr, momentum=self.settings.momentum, weight_decay=self.settings.weight_decay
        )
        log = dict(self.record, epochs=[], best_epoch=None, status="running", resumed_after_epochs=[])
        best_val = -1.0
        start_epoch = 0
        if self.folders.checkpoint.is_file():
            checkpoint = load_torch(self.folders.checkpoint)
            self.modules.load_state_dict(checkpoint["modules"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            log["epochs"], log["best_epoch"] = checkpoint["epochs"], checkpoint["best_epoch"]
            best_val, start_epoch = checkpoint["best_val"], len(checkpoint["epochs"])
            log["resumed_after_epochs"] = [*checkpoint.get("resumed_after_epochs", []), start_epoch]
        progress = tqdm(
            range(start_epoch, self.settings.epochs), initial=start_epoch, total=self.settings.epochs,
            desc=self.folders.name[:60], file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        for epoch in progress:
            entry = self._train_one_epoch(optimizer, epoch)
            self.stage.heartbeat()
            log["epochs"].append(entry)
            val_acc = entry["val_acc"]
            if val_acc is not None and val_acc > best_val:
                best_val, log["best_epoch"] = val_acc, entry["epoch"]
                save_torch(self.folders.best_weights, self.saved_state())
            save_torch(
                self.folders.checkpoint,
                {"modules": self.modules.state_dict(), "optimizer": optimizer.state_dict(),
                 "epochs": log["epochs"], "best_epoch": log["best_epoch"], "best_val": best_val,
                 "resumed_after_epochs": log["resumed_after_epochs"]},
            )
            write_stage_log(self.folders, log, plots=False)
            progress.set_postfix(loss=f"{entry['train_loss']:.3f}", val=_percent(val_acc), test=_percent(entry["test_acc"]))
        progress.close()
        save_torch(self.folders.final_weights, self.saved_state())
        log["status"] = "done"
        return log

    def _train_one_epoch(self, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
        lr = learning_rate(self.settings, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.modules.train()
        started = time.perf_counter()
        term_sums: dict[str, float] = {}
        correct = seen = 0
        for step, (images, labels) in enumerate(training_batches(self.data, self.settings, epoch)):
            images, labels = images.to(self.device), labels.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.stage.amp):
                terms, logits = self.compute_terms(images, labels, epoch)
            total = sum(terms.values())
            for name, value in terms.items():
                if not torch.isfinite(value):
                    raise NonFiniteLossError(
                        f"{self.folders.logs}: loss term {name!r} is {value.item()} at epoch {epoch + 1} step {step + 1}; "
                        "lower the learning rate or this term's weight"
                    )
                term_sums[name] = term_sums.get(name, 0.0) + value.item() * len(labels)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            seen += len(labels)
            if logits is not None:
                correct += (logits.argmax(dim=1) == labels).sum().item()
        terms_mean = {name: value / seen for name, value in term_sums.items()}
        entry = {
            "epoch": epoch + 1,
            "train_loss": sum(terms_mean.values()),
            "terms": terms_mean,
            "train_acc": 100.0 * correct / seen if self.classifier is not None else None,
            "val_acc": None,
            "test_acc": None,
            "lr": lr,
        }
        if self.classifier is not None:
            batch = self.settings.batch_size * 4
            entry["val_acc"] = accuracy(predict(self.classifier, self.data.val_images, batch, self.device), self.data.val_labels)
            entry["test_acc"] = accuracy(predict(self.classifier, self.data.test_images, batch, self.device), self.data.test_labels)
        entry["epoch_time_s"] = time.perf_counter() - started
        return entry


def training_outputs(folders: StageFolders) -> list[Path]:
    """The files a training stage promises in its DONE: final weights, and best weights when validated."""
    return [folders.final_weights, *([folders.best_weights] if folders.best_weights.is_file() else [])]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"

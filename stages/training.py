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

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from lion_pytorch import Lion
from torch import nn
from tqdm import tqdm

from data.registry import Splits
from pipeline.store import StageFolders
from stages.context import StageRun
from stages.distributed import Ranks, sync_batchnorm
from stages.files import StageError, load_torch, save_torch, write_stage_log
from stages.runtime import RuntimeSwitches

ComputeTerms = Callable[
    [torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Generator], tuple[dict[str, torch.Tensor], torch.Tensor | None]
]
"""(images, labels, 0-based epoch, each sample's index into the training set, the step's generator) ->
(named loss terms, logits or None when the stage has no classifier)."""


@dataclass(frozen=True)
class TrainingSettings:
    """``milestones`` and ``gamma`` shape the step schedule only; ``milestones`` None means the recipe's.
    ``momentum`` and ``nesterov`` are sgd's, ``betas`` (None: the optimiser's own) adamw's and lion's,
    ``pct_start`` the onecycle schedule's."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    nesterov: bool
    betas: tuple[float, float] | None
    weight_decay: float
    lr_schedule: str
    warmup_epochs: int
    pct_start: float
    milestones: tuple[int, ...] | None
    gamma: float
    augment: bool
    seed: int

    @classmethod
    def from_settings(cls, training: Mapping[str, Any], seed: int) -> "TrainingSettings":
        milestones, betas = training["milestones"], training["betas"]
        return cls(
            epochs=int(training["epochs"]),
            batch_size=int(training["batch_size"]),
            lr=float(training["lr"]),
            optimizer=str(training["optimizer"]),
            momentum=float(training["momentum"]),
            nesterov=bool(training["nesterov"]),
            betas=None if betas is None else (float(betas[0]), float(betas[1])),
            weight_decay=float(training["weight_decay"]),
            lr_schedule=str(training["lr_schedule"]),
            warmup_epochs=int(training["warmup_epochs"]),
            pct_start=float(training["pct_start"]),
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


def learning_rate(settings: TrainingSettings, epoch: int, step_in_epoch: int = 0, steps_per_epoch: int = 1) -> float:
    """Learning rate of 0-based step ``step_in_epoch`` of 0-based ``epoch``; a pure function of the two, so
    resuming needs no scheduler state.

    cosine, step and constant change once per epoch. onecycle is torch's ``OneCycleLR`` with its
    defaults (cosine annealing, two phases, div_factor 25, final_div_factor 1e4; momentum is not
    cycled) over epochs x steps_per_epoch steps with max_lr = lr: from lr/25 up to lr over the first
    ``pct_start`` of the steps, then down to lr/25e4 at the last step. Warm-up multiplies any schedule
    by (t + 1) / (warmup_epochs x steps_per_epoch) at global step t below that count, a linear ramp that
    reaches the schedule's own value at the last warm-up step (Goyal et al.'s gradual warm-up, per step).
    """
    step = epoch * steps_per_epoch + step_in_epoch
    warmup_steps = settings.warmup_epochs * steps_per_epoch
    ramp = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    return ramp * _scheduled_rate(settings, epoch, step, steps_per_epoch)


def _scheduled_rate(settings: TrainingSettings, epoch: int, step: int, steps_per_epoch: int) -> float:
    if settings.lr_schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / settings.epochs))
    if settings.lr_schedule == "step":
        drops = sum(epoch >= milestone for milestone in settings.step_milestones)
        return settings.lr * settings.gamma**drops
    if settings.lr_schedule == "constant":
        return settings.lr
    if settings.lr_schedule == "onecycle":
        return _one_cycle_rate(settings.lr, settings.pct_start, step, settings.epochs * steps_per_epoch)
    raise ValueError(f"unknown lr_schedule {settings.lr_schedule!r}; allowed: cosine, step, constant, onecycle")


def _one_cycle_rate(max_lr: float, pct_start: float, step: int, total_steps: int) -> float:
    """``OneCycleLR``'s lr after ``step`` scheduler steps, written out as its get_lr computes it (same float
    operations, so the two agree to the last bit). Where the warm phase is the first step alone, torch
    divides by zero; here that step is at max_lr."""
    initial_lr = max_lr / 25.0
    min_lr = initial_lr / 1e4
    warm_end, cool_end = float(pct_start * total_steps) - 1, total_steps - 1
    if step <= warm_end:
        return _cosine_anneal(initial_lr, max_lr, step / warm_end if warm_end > 0 else 1.0)
    return _cosine_anneal(max_lr, min_lr, (step - warm_end) / (cool_end - warm_end))


def _cosine_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def build_optimizer(parameters: Iterable[nn.Parameter] | list[dict[str, Any]], settings: TrainingSettings) -> torch.optim.Optimizer:
    """The stage's optimiser at ``settings.lr``; the loop sets each step's lr from ``learning_rate``.

    adamw's weight decay is torch's decoupled one, lion's (lion-pytorch) the same: both shrink the
    weights by lr x weight_decay each step, where sgd adds weight_decay x the weights to the gradient.
    """
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov,
            weight_decay=settings.weight_decay,
        )
    if settings.optimizer == "adamw":
        betas = settings.betas or (0.9, 0.999)
        return torch.optim.AdamW(parameters, lr=settings.lr, betas=betas, weight_decay=settings.weight_decay)
    if settings.optimizer == "lion":
        betas = settings.betas or (0.9, 0.99)
        return Lion(parameters, lr=settings.lr, betas=betas, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; allowed: sgd, adamw, lion")


def parameter_groups(modules: nn.Module, lr_scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """The trainable parameters of ``modules`` in one optimiser group per lr scale.

    ``lr_scales`` maps module paths to a factor on the scheduled lr; a parameter takes the factor of
    the longest path it lies under (``{"model": 0.01, "model.fc": 1.0}``: the backbone at 1% and the
    classifier at full lr), else 1. Each group carries its ``lr_scale`` for the loop, which sets every
    step's lr, and in the optimiser's state, so a resumed run keeps it.
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for name, parameter in modules.named_parameters():
        if not parameter.requires_grad:
            continue
        owners = [path for path in lr_scales if name == path or name.startswith(f"{path}.")]
        scale = float(lr_scales[max(owners, key=len)]) if owners else 1.0
        groups.setdefault(scale, []).append(parameter)
    return [{"params": parameters, "lr_scale": scale} for scale, parameters in groups.items()]


def backbone_lr_scales(model_path: str, backbone_lr_scale: float) -> dict[str, float]:
    """``lr_scales`` for fine-tuning the model at ``model_path``: its classifier (``fc``) at the full lr,
    the rest at ``backbone_lr_scale``; nothing at all when that is 1."""
    if backbone_lr_scale == 1.0:
        return {}
    return {model_path: backbone_lr_scale, f"{model_path}.fc": 1.0}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of one training step's own random draws (mixup's weights, CRD's negatives):
    a function of (seed, epoch, step), so a resumed epoch, which restarts at its first step, draws
    what the uninterrupted one drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)


def training_batches(data: Splits, settings: TrainingSettings, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented training batches of one epoch, as (images, labels, indices): each sample's
    index into the training set, for methods that keep per-sample state. The order and every
    augmentation draw come from the epoch's generator, in memory or streamed alike."""
    generator = epoch_generator(settings.seed, epoch)
    # drawn on the host, moved once per epoch: labels, indices and (resident) images are picked where they live
    order = torch.randperm(len(data.train_labels), generator=generator).to(data.train_labels.device)
    images = data.epoch_images(order, settings.batch_size, generator if settings.augment else None)
    for start, batch in zip(range(0, len(order), settings.batch_size), images):
        index = order[start : start + settings.batch_size]
        yield data.normalise(batch), data.train_labels[index], index


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
    normalise: Callable[[torch.Tensor], torch.Tensor], switches: RuntimeSwitches = RuntimeSwitches(),
) -> torch.Tensor:
    """Logits of ``model`` in eval mode, as float32 on the CPU, for the uint8 image ``batches``
    (``split_images``) turned into its inputs by ``normalise`` (the data's) on ``device``, under the
    stage's ``switches`` (bfloat16 autocast, channels-last inputs) as in training."""
    was_training = model.training
    model.eval()
    with switches.autocast(device):
        outputs = [model(switches.inputs(normalise(images.to(device)), device)).float() for images in batches]
    model.train(was_training)
    # One copy to the host at the end: a copy per batch would make the host wait on each batch in turn.
    return torch.cat(outputs).cpu() if outputs else torch.empty(0)


def evaluation_batch_size(training_batch_size: int, device: torch.device) -> int:
    """Images per forward pass when scoring a split: 4x the training batch on a GPU, which has the
    memory to spare and runs faster on bigger batches; the training batch on a CPU, where a bigger
    batch is no faster and its activations would raise the stage's peak memory (eval mode: the
    batch size does not change a logit's value beyond float rounding)."""
    return training_batch_size * 4 if device.type == "cuda" else training_batch_size


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
    The stage's runtime switches (``StageRun.switches``) shape every forward pass: bfloat16 autocast,
    channels-last batches; the stage prepared its modules for them (``StageRun.prepare``). Every
    epoch starts by refreshing the stage's lease, so a runner that lost it writes nothing more.
    ``lr_scales`` (``parameter_groups``) train parts of ``modules`` at a fraction of the scheduled lr.
    """

    stage: StageRun
    record: dict[str, Any]
    modules: nn.ModuleDict
    compute_terms: ComputeTerms
    data: Splits
    settings: TrainingSettings
    classifier: nn.Module | None
    saved_state: Callable[[], dict[str, Any]]
    lr_scales: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def folders(self) -> StageFolders:
        return self.stage.folders

    @property
    def device(self) -> torch.device:
        return self.stage.device

    def run(self) -> dict[str, Any]:
        ranks = self.stage.ranks
        if ranks.world > 1:
            sync_batchnorm(self.modules, self.device)
        optimizer = build_optimizer(parameter_groups(self.modules, self.lr_scales), self.settings)
        log = dict(self.record, epochs=[], best_epoch=None, status="running", resumed_after_epochs=[],
                   data_device=str(self.data.train_labels.device))
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
            disable=not ranks.writer,
        )
        for epoch in progress:
            entry = self._train_one_epoch(optimizer, epoch)
            log["epochs"].append(entry)
            if not ranks.writer:
                continue
            self.stage.heartbeat()
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
        if ranks.writer:
            save_torch(self.folders.final_weights, self.saved_state())
        log["status"] = "done"
        return log

    def _stop_if_not_finite(self, sums: "_DeviceSums", epoch: int) -> None:
        problem = sums.first_not_finite()
        if problem is not None:
            name, value, step = problem
            raise NonFiniteLossError(
                f"{self.folders.logs}: loss term {name!r} is {value} at epoch {epoch + 1} step {step + 1}; "
                "lower the learning rate or this term's weight"
            )

    def _train_one_epoch(self, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
        steps_per_epoch = math.ceil(len(self.data.train_labels) / self.settings.batch_size)
        lr = learning_rate(self.settings, epoch, 0, steps_per_epoch)
        self.modules.train()
        started = time.perf_counter()
        sums = _DeviceSums(self.device)
        ranks, switches = self.stage.ranks, self.stage.switches
        seen = 0
        for step, (images, labels, indices) in enumerate(training_batches(self.data, self.settings, epoch)):
            batch_size = len(labels)
            if ranks.world > 1:  # this rank's share of the global batch
                share = ranks.shard(batch_size)
                images, labels, indices = images[share], labels[share], indices[share]
            images, labels, indices = switches.inputs(images, self.device), labels.to(self.device), indices.to(self.device)
            rate = learning_rate(self.settings, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                # A checkpoint written before lr scales existed has groups without one.
                group["lr"] = rate * group.get("lr_scale", 1.0)
            optimizer.zero_grad(set_to_none=True)
            if len(labels):
                with switches.autocast(self.device):
                    terms, logits = self.compute_terms(images, labels, epoch, indices, step_generator(self.settings.seed, epoch, step))
                sums.add(step, terms, len(labels), logits, labels)
                loss = sum(terms.values())
                # Weighted by the share, the ranks' summed gradients are the whole batch's mean gradient.
                (loss if ranks.world == 1 else loss * (len(labels) / batch_size)).backward()
            ranks.sum_gradients(parameter for group in optimizer.param_groups for parameter in group["params"])
            if (step + 1) % SYNC_EVERY_STEPS == 0:
                self._stop_if_not_finite(sums, epoch)
            optimizer.step()
            seen += len(labels)
        self._stop_if_not_finite(sums, epoch)
        term_sums, correct, seen = sums.read(ranks, seen)
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
        if self.classifier is not None and ranks.writer:
            batch = evaluation_batch_size(self.settings.batch_size, self.device)
            for split in ("val", "test"):
                logits = predict(self.classifier, self.data.split_images(split, batch), self.device, self.data.normalise, switches)
                entry[f"{split}_acc"] = accuracy(logits, getattr(self.data, f"{split}_labels"))
        entry["epoch_time_s"] = time.perf_counter() - started
        return entry


SYNC_EVERY_STEPS = 50
"""How often the loop reads the device's loss checks: a non-finite term stops training at most this
many steps after it appeared (the checkpoint is the last whole epoch's either way), while no step
waits for the device to catch up."""


class _DeviceSums:
    """An epoch's loss-term sums, correct predictions and first non-finite term, kept on the device.

    Reading a value (``.item()``) makes the host wait for the device; done every step, it keeps a GPU
    idle between steps. Here every step only queues tensor operations, and the host reads all of it
    at once (``read``, ``first_not_finite``). The sums are float64 of (term x batch size), added in
    step order, the same numbers as summing ``.item()`` values in Python.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.term_sums: dict[str, torch.Tensor] = {}
        self.bad_step: dict[str, torch.Tensor] = {}
        self.bad_value: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, step: int, terms: Mapping[str, torch.Tensor], count: int, logits: torch.Tensor | None, labels: torch.Tensor) -> None:
        for name, value in terms.items():
            value = value.detach().double()
            if name not in self.term_sums:
                self.term_sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
                self.bad_step[name] = torch.full((), -1, dtype=torch.int64, device=self.device)
                self.bad_value[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            self.term_sums[name] += value * count
            first = (self.bad_step[name] < 0) & ~torch.isfinite(value)
            self.bad_step[name] = torch.where(first, step, self.bad_step[name])
            self.bad_value[name] = torch.where(first, value, self.bad_value[name])
        if logits is not None:
            self.correct += (logits.argmax(dim=1) == labels).sum()

    def first_not_finite(self) -> tuple[str, float, int] | None:
        """(term, its value, 0-based step) of the earliest non-finite term so far, or None."""
        if not self.bad_step:
            return None
        names = list(self.bad_step)
        steps = torch.stack([self.bad_step[name] for name in names]).tolist()
        found = [(step, index) for index, step in enumerate(steps) if step >= 0]
        if not found:
            return None
        step, index = min(found)
        return names[index], self.bad_value[names[index]].item(), step

    def read(self, ranks: Ranks, seen: int) -> tuple[dict[str, float], int, int]:
        """The term sums, the number of correct predictions and of samples (this rank's ``seen``), as
        Python numbers: each summed over the ranks."""
        if ranks.world == 1:
            values = torch.stack(list(self.term_sums.values())).tolist() if self.term_sums else []
            return dict(zip(self.term_sums, values)), int(self.correct.item()), seen
        counts = ranks.sum(torch.stack([self.correct, torch.tensor(seen, device=self.device)]))
        values = ranks.sum(torch.stack(list(self.term_sums.values()))).tolist() if self.term_sums else []
        return dict(zip(self.term_sums, values)), int(counts[0].item()), int(counts[1].item())


def training_outputs(folders: StageFolders) -> list[Path]:
    """The files a training stage promises in its DONE: final weights, and best weights when validated."""
    return [folders.final_weights, *([folders.best_weights] if folders.best_weights.is_file() else [])]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"

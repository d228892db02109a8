"""Factor Transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018).

The teacher's feature map is first "paraphrased": a convolutional autoencoder (the paraphraser) is
trained to reconstruct it, and its bottleneck output is the teacher factor. The paraphraser is then
frozen, and a translator on the student's feature map is trained with the student so that the
L2-normalised student factor matches the teacher factor (``ft_term``). The whole factor is compared,
as in the paper, not the channel average of its square that RepDistiller's distiller_zoo/FT.py
normalises and compares under the same name.

What we follow is the authors' released code (github.com/Jangho-Kim/Factor-Transfer-pytorch):

* Models/FeatureProjection.py: the paraphraser's encoder is 3x3 convolutions C -> C -> kC -> kC, its
  decoder 3x3 transposed convolutions kC -> kC -> C -> C, all stride 1, padding 1, with bias, each
  followed by LeakyReLU(0.1) (the decoder's last one too); the translator is the encoder's
  structure on the student's map. The batch norms there are commented out, so ``batch_norm`` is off
  by default (RepDistiller's models/util.py has none in its paraphraser either, but puts them in
  its translator by default).
* train_student.py and utils.py: the FT term is BETA x nn.L1Loss(F.normalize(factor_s.view(N, -1)),
  F.normalize(factor_t.view(N, -1))) with BETA 500, i.e. beta times the mean absolute difference
  over the batch and every factor entry, next to a cross-entropy of weight 1 (``form: code``). The
  paper writes beta/2 x the p-norm of the difference per sample instead (``form: paper``); for
  p = 1 that is D/2 times the code's term for factors of D entries, so a beta tuned for one form
  does not carry over: with beta 500 the paper form on a resnet32x4 layer3 factor (D = 512) starts
  near 5,000 and diverged in a trial run. (RepDistiller's scripts give its own distance weight 200.)
* train_Paraphraser.py: the paraphraser is trained with nn.L1Loss (``recon_loss: l1``).

The paraphraser is trained by a pre-stage; this file gives that stage what it needs:
``build_paraphraser``, ``reconstruction_loss`` and the file layout
(``<pre_stage_dir>/final.pt`` holding ``{"paraphraser": state_dict, ...}``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distill._feature_maps import feature_map_shape
from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, TapPairMethod, register_method

METHOD = {
    "name": "ft",
    "summary": "factor transfer through a pre-trained paraphraser and a translator (Kim, Park & Kwak, NeurIPS 2018)",
    "uses_teacher": True,
    "params": {
        "teacher_tap": {"default": "layer3", "tap": "teacher", "help": "teacher feature map the paraphraser encodes"},
        "student_tap": {"default": "layer3", "tap": "student", "help": "student feature map the translator encodes"},
        "factor_rate": {"default": 0.5, "min": 0.01, "help": "paraphrase rate k: factor channels = round(teacher channels x k)"},
        "batch_norm": {"default": False, "help": "batch norm after each paraphraser and translator convolution (the authors' code has none)"},
        "recon_loss": {"default": "l1", "choices": ["l1", "l2"], "help": "paraphraser reconstruction loss"},
        "paraphraser_epochs": {"type": "int", "required": True, "min": 1, "help": "epochs of paraphraser training"},
        "paraphraser_lr": {"default": 0.1, "min": 0.0, "help": "learning rate of the paraphraser pre-stage"},
        "paraphraser_batch_size": {"default": 64, "min": 1, "help": "batch size of the paraphraser pre-stage"},
        "form": {"default": "code", "choices": ["code", "paper"], "help": "FT term of the authors' code: beta x mean |u_t - u_s| over batch and entries; of the paper: beta / 2 x ||u_t - u_s||_p per sample, batch-averaged (u: L2-normalised factors)"},
        "p": {"default": 1, "choices": [1, 2], "help": "norm of the factor difference in the paper form (the paper uses 1); the code form is always the mean absolute difference"},
        "beta": {"default": 500.0, "min": 0.0, "help": "weight of the FT term (500 in the authors' code, set for the code form)"},
        "ce_weight": {"default": 1.0, "min": 0.0, "help": "weight of the cross-entropy on labels"},
    },
    "pre_stage": {
        "kind": "pretrain_paraphraser",
        "params": [
            "teacher_tap", "factor_rate", "batch_norm", "recon_loss",
            "paraphraser_epochs", "paraphraser_lr", "paraphraser_batch_size",
        ],
    },
}

# What the pre-stage writes into its weights folder: {"paraphraser": Paraphraser.state_dict(), ...}.
PARAPHRASER_FILE = "final.pt"


def _block(conv: nn.Module, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """conv -> [BN] -> LeakyReLU(0.1), the unit both the paraphraser and the translator are made of."""
    layers = [conv, nn.BatchNorm2d(out_channels)] if batch_norm else [conv]
    return nn.Sequential(*layers, nn.LeakyReLU(0.1))


def _convs(channels: list[int], batch_norm: bool, transposed: bool = False) -> nn.Sequential:
    """3x3, stride 1, padding 1 layers through ``channels``: the spatial size never changes."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return nn.Sequential(*(
        _block(conv(c_in, c_out, 3, stride=1, padding=1, bias=not batch_norm), c_out, batch_norm)
        for c_in, c_out in zip(channels, channels[1:])
    ))


class Paraphraser(nn.Module):
    """Autoencoder on a teacher feature map: 3 convolutions down to the factor, 3 transposed back."""

    def __init__(self, channels: int, factor_channels: int, batch_norm: bool):
        super().__init__()
        self.encoder = _convs([channels, channels, factor_channels, factor_channels], batch_norm)
        self.decoder = _convs([factor_channels, factor_channels, channels, channels], batch_norm, transposed=True)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """The teacher factor."""
        return self.encoder(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``features``, which the pre-stage trains against them."""
        return self.decoder(self.encoder(features))


class Translator(nn.Module):
    """3 convolutions from the student feature map to a factor shaped like the teacher's."""

    def __init__(self, channels: int, factor_channels: int, batch_norm: bool):
        super().__init__()
        self.layers = _convs([channels, channels, factor_channels, factor_channels], batch_norm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def factor_channels(channels: int, factor_rate: float) -> int:
    """The paper's paraphrase rate k: the factor has round(C x k) channels."""
    return round(channels * factor_rate)


def build_paraphraser(teacher_tap_shape: tuple[int, ...], params: Mapping[str, Any]) -> Paraphraser:
    """A fresh paraphraser for a teacher tap of per-sample shape (C, H, W)."""
    channels = teacher_tap_shape[0]
    return Paraphraser(channels, factor_channels(channels, params["factor_rate"]), params["batch_norm"])


def reconstruction_loss(reconstruction: torch.Tensor, features: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute ("l1") or mean squared ("l2") error of the paraphraser's reconstruction."""
    if kind == "l1":
        return F.l1_loss(reconstruction, features)
    if kind == "l2":
        return F.mse_loss(reconstruction, features)
    raise ValueError(f"recon_loss must be 'l1' or 'l2', got {kind!r}")


def ft_term(student_factor: torch.Tensor, teacher_factor: torch.Tensor, beta: float, form: str, p: int) -> torch.Tensor:
    """The FT loss term on factors (N, ...), each sample flattened and scaled to unit L2 norm (u_s, u_t).

    ``form="code"``: beta x mean |u_t - u_s| over the batch and all entries, as the authors' code
    computes it. ``form="paper"``: beta / 2 x ||u_t - u_s||_p per sample, averaged over the batch.
    """
    # In float32 even under autocast: half precision would round beta x a small distance too coarsely.
    student_unit = F.normalize(student_factor.flatten(1).float(), p=2, dim=1)
    teacher_unit = F.normalize(teacher_factor.flatten(1).float(), p=2, dim=1)
    if form == "code":
        return beta * (teacher_unit - student_unit).abs().mean()
    if form == "paper":
        return beta / 2 * torch.linalg.vector_norm(teacher_unit - student_unit, ord=p, dim=1).mean()
    raise ValueError(f"form must be 'code' or 'paper', got {form!r}")


@register_method
class FT(TapPairMethod):
    METHOD = METHOD

    def __init__(self, params: Mapping[str, Any], context: MethodContext):
        """Loads the pre-stage's paraphraser, frozen; without a pre_stage_dir (tests) it stays random."""
        super().__init__(params, context)
        teacher_shape = context.teacher_tap_shapes[self.params["teacher_tap"]]
        student_shape = context.student_tap_shapes[self.params["student_tap"]]
        self.paraphraser = build_paraphraser(teacher_shape, self.params)
        if context.pre_stage_dir is not None:
            saved = torch.load(os.path.join(context.pre_stage_dir, PARAPHRASER_FILE), map_location="cpu", weights_only=True)
            self.paraphraser.load_state_dict(saved["paraphraser"])
        self.paraphraser.requires_grad_(False).eval()
        factors = factor_channels(teacher_shape[0], self.params["factor_rate"])
        self.translator = Translator(student_shape[0], factors, self.params["batch_norm"])

    @classmethod
    def check(cls, params: Mapping[str, Any], context: MethodContext) -> None:
        teacher_shape = feature_map_shape(context, params, "teacher_tap")
        student_shape = feature_map_shape(context, params, "student_tap")
        if teacher_shape[1:] != student_shape[1:]:
            raise MethodConfigError(
                "student_tap",
                f"factors are compared position by position, but student tap {params['student_tap']!r} "
                f"is {student_shape[1]}x{student_shape[2]} and teacher tap {params['teacher_tap']!r} is "
                f"{teacher_shape[1]}x{teacher_shape[2]}; pick taps of equal spatial size",
            )
        if factor_channels(teacher_shape[0], params["factor_rate"]) < 1:
            raise MethodConfigError("factor_rate", f"{params['factor_rate']} x {teacher_shape[0]} channels rounds to no factor channel")

    def train(self, mode: bool = True) -> FT:
        """Train the translator only: the frozen paraphraser's batch norm keeps its pre-stage statistics."""
        super().train(mode)
        self.paraphraser.eval()
        return self

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None, "uses_teacher is True, so the training loop passes the teacher's output"
        with torch.no_grad():
            teacher_factor = self.paraphraser.encode(teacher.features[self.params["teacher_tap"]])
        student_factor = self.translator(student.features[self.params["student_tap"]])
        return {
            "ce": self.cross_entropy(student, batch),
            "ft": ft_term(student_factor, teacher_factor, self.params["beta"], self.params["form"], self.params["p"]),
        }

"""The CRD benchmark's CIFAR zoo: sizes as published, taps as documented, RepDistiller weights importable.

The RepDistiller state dicts here are written from RepDistiller's own module layout (its key names and
tensor shapes, read from HobbitLong/RepDistiller models/*.py), never from our modules, so a wrong
rename or a wrong layer shape in our networks fails the strict load.
"""
from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from models import mobilenetv2_cifar, resnet_cifar, shufflenet_cifar, vgg_cifar, wrn
from models.taps import FeatureTaps

Shapes = Iterator[tuple[str, tuple[int, ...]]]

# Tian et al., ICLR 2020, CIFAR-100 tables (millions of parameters at 100 classes).
PUBLISHED_MILLIONS = {
    "wrn_40_2": 2.26, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "resnet56": 0.86, "resnet110": 1.73,
    "resnet32x4": 7.43, "resnet8x4": 1.23, "vgg13": 9.46, "vgg8": 3.96, "mobilenetv2": 0.81,
    "shufflenetv1": 0.95, "shufflenetv2": 1.35, "resnet32": 0.47, "resnet20": 0.28,
}
FAMILY = {
    **dict.fromkeys(["wrn_16_2", "wrn_40_1", "wrn_40_2"], wrn),
    **dict.fromkeys(["vgg8", "vgg13"], vgg_cifar),
    "mobilenetv2": mobilenetv2_cifar,
    **dict.fromkeys(["shufflenetv1", "shufflenetv2"], shufflenet_cifar),
    **dict.fromkeys(["resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4"], resnet_cifar),
}
# Last stage's per-sample shape on 32x32 CIFAR (RepDistiller's last spatial feature) and whether
# the stage taps are post-ReLU, as each family's docstring says.
LAST_STAGE = {
    "wrn_16_2": ("layer3", (128, 8, 8), False), "wrn_40_1": ("layer3", (64, 8, 8), False),
    "wrn_40_2": ("layer3", (128, 8, 8), False), "vgg8": ("layer4", (512, 4, 4), True),
    "vgg13": ("layer4", (512, 4, 4), True), "mobilenetv2": ("layer4", (160, 2, 2), False),
    "shufflenetv1": ("layer3", (960, 4, 4), True), "shufflenetv2": ("layer3", (464, 4, 4), True),
    "resnet20": ("layer3", (64, 8, 8), True), "resnet32": ("layer3", (64, 8, 8), True),
    "resnet56": ("layer3", (64, 8, 8), True), "resnet110": ("layer3", (64, 8, 8), True),
    "resnet8x4": ("layer3", (256, 8, 8), True), "resnet32x4": ("layer3", (256, 8, 8), True),
}
CIFAR = (3, 32, 32)


def _bn(prefix: str, channels: int) -> Shapes:
    for name in ("weight", "bias", "running_mean", "running_var"):
        yield f"{prefix}.{name}", (channels,)
    yield f"{prefix}.num_batches_tracked", ()


def _repdistiller_resnet(depth: int, widths: list[int], classes: int) -> Shapes:
    yield "conv1.weight", (widths[0], 3, 3, 3)
    yield from _bn("bn1", widths[0])
    inplanes = widths[0]
    for stage in (1, 2, 3):
        planes = widths[stage]
        for block in range((depth - 2) // 6):
            prefix = f"layer{stage}.{block}"
            yield f"{prefix}.conv1.weight", (planes, inplanes, 3, 3)
            yield from _bn(f"{prefix}.bn1", planes)
            yield f"{prefix}.conv2.weight", (planes, planes, 3, 3)
            yield from _bn(f"{prefix}.bn2", planes)
            if block == 0 and (stage > 1 or inplanes != planes):
                yield f"{prefix}.downsample.0.weight", (planes, inplanes, 1, 1)
                yield from _bn(f"{prefix}.downsample.1", planes)
            inplanes = planes
    yield "fc.weight", (classes, widths[3])
    yield "fc.bias", (classes,)


def _repdistiller_wrn(depth: int, k: int, classes: int) -> Shapes:
    yield "conv1.weight", (16, 3, 3, 3)
    in_planes = 16
    for stage, out_planes in zip((1, 2, 3), (16 * k, 32 * k, 64 * k)):
        for block in range((depth - 4) // 6):
            prefix = f"block{stage}.layer.{block}"
            yield from _bn(f"{prefix}.bn1", in_planes)
            yield f"{prefix}.conv1.weight", (out_planes, in_planes, 3, 3)
            yield from _bn(f"{prefix}.bn2", out_planes)
            yield f"{prefix}.conv2.weight", (out_planes, out_planes, 3, 3)
            if in_planes != out_planes:
                yield f"{prefix}.convShortcut.weight", (out_planes, in_planes, 1, 1)
            in_planes = out_planes
    yield from _bn("bn1", 64 * k)
    yield "fc.weight", (classes, 64 * k)
    yield "fc.bias", (classes,)


def _repdistiller_vgg(cfg: list[list[int]], classes: int) -> Shapes:
    in_channels = 3
    for block, widths in enumerate(cfg):
        for position, width in enumerate(widths):  # conv, bn, relu per width; the last relu dropped
            yield f"block{block}.{3 * position}.weight", (width, in_channels, 3, 3)
            yield f"block{block}.{3 * position}.bias", (width,)
            yield from _bn(f"block{block}.{3 * position + 1}", width)
            in_channels = width
    yield "classifier.weight", (classes, 512)
    yield "classifier.bias", (classes,)


def _repdistiller_mobile_half(classes: int) -> Shapes:
    yield "conv1.0.weight", (16, 3, 3, 3)
    yield from _bn("conv1.1", 16)
    settings = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    inp = 16
    for group, (t, c, n) in enumerate(settings):
        oup = c // 2
        for block in range(n):
            prefix, hidden = f"blocks.{group}.{block}.conv", inp * t
            yield f"{prefix}.0.weight", (hidden, inp, 1, 1)
            yield from _bn(f"{prefix}.1", hidden)
            yield f"{prefix}.3.weight", (hidden, 1, 3, 3)
            yield from _bn(f"{prefix}.4", hidden)
            yield f"{prefix}.6.weight", (oup, hidden, 1, 1)
            yield from _bn(f"{prefix}.7", oup)
            inp = oup
    yield "conv2.0.weight", (1280, 160, 1, 1)
    yield from _bn("conv2.1", 1280)
    yield "classifier.0.weight", (classes, 1280)
    yield "classifier.0.bias", (classes,)


def _repdistiller_shufflev1(classes: int) -> Shapes:
    yield "conv1.weight", (24, 3, 1, 1)
    yield from _bn("bn1", 24)
    in_planes = 24
    for stage, (out_planes, blocks) in enumerate([(240, 4), (480, 8), (960, 4)], start=1):
        for block in range(blocks):
            out = out_planes - (in_planes if block == 0 else 0)
            mid, g = out // 4, 1 if in_planes == 24 else 3
            prefix = f"layer{stage}.{block}"
            yield f"{prefix}.conv1.weight", (mid, in_planes // g, 1, 1)
            yield from _bn(f"{prefix}.bn1", mid)
            yield f"{prefix}.conv2.weight", (mid, 1, 3, 3)
            yield from _bn(f"{prefix}.bn2", mid)
            yield f"{prefix}.conv3.weight", (out, mid // 3, 1, 1)
            yield from _bn(f"{prefix}.bn3", out)
            in_planes = out_planes
    yield "linear.weight", (classes, 960)
    yield "linear.bias", (classes,)


def _repdistiller_shufflev2(classes: int) -> Shapes:
    yield "conv1.weight", (24, 3, 1, 1)
    yield from _bn("bn1", 24)
    in_channels = 24
    for stage, (out, blocks) in enumerate([(116, 3), (232, 7), (464, 3)], start=1):
        half, down = out // 2, f"layer{stage}.0"
        yield f"{down}.conv1.weight", (in_channels, 1, 3, 3)
        yield from _bn(f"{down}.bn1", in_channels)
        yield f"{down}.conv2.weight", (half, in_channels, 1, 1)
        yield from _bn(f"{down}.bn2", half)
        yield f"{down}.conv3.weight", (half, in_channels, 1, 1)
        yield from _bn(f"{down}.bn3", half)
        yield f"{down}.conv4.weight", (half, 1, 3, 3)
        yield from _bn(f"{down}.bn4", half)
        yield f"{down}.conv5.weight", (half, half, 1, 1)
        yield from _bn(f"{down}.bn5", half)
        for block in range(1, blocks + 1):
            prefix = f"layer{stage}.{block}"
            for conv, shape in (("1", (half, half, 1, 1)), ("2", (half, 1, 3, 3)), ("3", (half, half, 1, 1))):
                yield f"{prefix}.conv{conv}.weight", shape
                yield from _bn(f"{prefix}.bn{conv}", half)
        in_channels = out
    yield "conv2.weight", (1024, 464, 1, 1)
    yield from _bn("bn2", 1024)
    yield "linear.weight", (classes, 1024)
    yield "linear.bias", (classes,)


REPDISTILLER: dict[str, Callable[[int], Shapes]] = {
    "resnet20": lambda c: _repdistiller_resnet(20, [16, 16, 32, 64], c),
    "resnet32": lambda c: _repdistiller_resnet(32, [16, 16, 32, 64], c),
    "resnet56": lambda c: _repdistiller_resnet(56, [16, 16, 32, 64], c),
    "resnet110": lambda c: _repdistiller_resnet(110, [16, 16, 32, 64], c),
    "resnet8x4": lambda c: _repdistiller_resnet(8, [32, 64, 128, 256], c),
    "resnet32x4": lambda c: _repdistiller_resnet(32, [32, 64, 128, 256], c),
    "wrn_16_2": lambda c: _repdistiller_wrn(16, 2, c),
    "wrn_40_1": lambda c: _repdistiller_wrn(40, 1, c),
    "wrn_40_2": lambda c: _repdistiller_wrn(40, 2, c),
    "vgg8": lambda c: _repdistiller_vgg([[64], [128], [256], [512], [512]], c),
    "vgg13": lambda c: _repdistiller_vgg([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], c),
    "mobilenetv2": _repdistiller_mobile_half,
    "shufflenetv1": _repdistiller_shufflev1,
    "shufflenetv2": _repdistiller_shufflev2,
}
FC_KEYS = {"vgg": "classifier", "mobilenetv2": "classifier.0", "shufflenet": "linear"}


def _random_state(arch: str, classes: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in REPDISTILLER[arch](classes):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state


def _batch_norm(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                        state[f"{prefix}.weight"], state[f"{prefix}.bias"])


def _repdistiller_stem(arch: str, x: Tensor, state: dict[str, Tensor]) -> Tensor:
    """RepDistiller's f0, written from its forward(), on the given (eval-mode) weights."""
    if arch.startswith("wrn"):
        return F.conv2d(x, state["conv1.weight"], padding=1)
    if arch.startswith("vgg"):
        convs = sorted(int(key.split(".")[1]) for key, value in state.items()
                       if key.startswith("block0.") and key.endswith(".weight") and value.dim() == 4)
        for conv in convs:
            x = F.conv2d(x, state[f"block0.{conv}.weight"], state[f"block0.{conv}.bias"], padding=1)
            x = torch.relu(_batch_norm(x, state, f"block0.{conv + 1}"))
        return x
    if arch == "mobilenetv2":
        return torch.relu(_batch_norm(F.conv2d(x, state["conv1.0.weight"], stride=2, padding=1), state, "conv1.1"))
    padding = 1 if arch.startswith("resnet") else 0
    return torch.relu(_batch_norm(F.conv2d(x, state["conv1.weight"], padding=padding), state, "bn1"))


def _repdistiller_head(arch: str, last_stage: Tensor, state: dict[str, Tensor]) -> Tensor:
    """RepDistiller's logits from its last tapped feature map, written from its forward()."""
    if arch.startswith("wrn"):
        last_stage = torch.relu(_batch_norm(last_stage, state, "bn1"))
    elif arch == "mobilenetv2":
        last_stage = torch.relu(_batch_norm(F.conv2d(last_stage, state["conv2.0.weight"]), state, "conv2.1"))
    elif arch == "shufflenetv2":
        last_stage = torch.relu(_batch_norm(F.conv2d(last_stage, state["conv2.weight"]), state, "bn2"))
    pooled = last_stage.mean(dim=(2, 3))
    fc = next((key for prefix, key in FC_KEYS.items() if arch.startswith(prefix)), "fc")
    return F.linear(pooled, state[f"{fc}.weight"], state[f"{fc}.bias"])


@pytest.mark.parametrize("arch", sorted(PUBLISHED_MILLIONS))
def test_parameter_count_matches_the_crd_table(arch: str) -> None:
    model = FAMILY[arch].build(arch, 100, CIFAR)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[arch], rel=0.01)


@pytest.mark.parametrize("arch", sorted(FAMILY))
def test_forward_and_every_declared_tap(arch: str) -> None:
    family = FAMILY[arch]
    model = family.build(arch, 100, CIFAR)
    declared = family.ARCHITECTURES[arch]["taps"]
    assert {"stem", "layer1", "layer2", "layer3", "pool"} <= set(declared)
    with FeatureTaps(model, declared) as tapped:
        logits, features = tapped(torch.randn(2, *CIFAR))
    assert logits.shape == (2, 100)
    assert features["pool"].shape == (2, model.fc.in_features)
    stage, shape, post_relu = LAST_STAGE[arch]
    assert tuple(features[stage].shape) == (2, *shape)
    stage_taps = [tap for tap in declared if tap.startswith("layer")]
    assert all((features[tap] >= 0).all() == post_relu for tap in stage_taps)


@pytest.mark.parametrize("arch", sorted(FAMILY))
def test_smallest_declared_image_and_one_channel_run(arch: str) -> None:
    family = FAMILY[arch]
    side = family.ARCHITECTURES[arch]["min_image_size"]
    model = family.build(arch, 10, (1, side, side))
    assert model(torch.randn(2, 1, side, side)).shape == (2, 10)


def test_vgg_refuses_below_its_smallest_image() -> None:
    side = vgg_cifar.ARCHITECTURES["vgg8"]["min_image_size"] // 2
    with pytest.raises(RuntimeError):
        vgg_cifar.build("vgg8", 10, (3, side, side))(torch.randn(2, 3, side, side))


def test_vgg_keeps_the_fourth_max_pool_for_64_pixel_images() -> None:
    small, large = vgg_cifar.build("vgg8", 10, CIFAR), vgg_cifar.build("vgg8", 10, (3, 64, 64))
    assert set(small.state_dict()) == set(large.state_dict())
    with FeatureTaps(large, ["layer4"]) as tapped:
        _, features = tapped(torch.randn(2, 3, 64, 64))
    assert features["layer4"].shape == (2, 512, 4, 4)


@pytest.mark.parametrize("family", [wrn, vgg_cifar, mobilenetv2_cifar, shufflenet_cifar, resnet_cifar])
def test_architectures_literal_reads_without_torch(family: ModuleType) -> None:
    tree = ast.parse(Path(family.__file__).read_text())
    literal = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(target, "id", None) == "ARCHITECTURES" for target in node.targets))
    assert ast.literal_eval(literal) == family.ARCHITECTURES
    assert all(isinstance(entry["min_image_size"], int) for entry in family.ARCHITECTURES.values())


@pytest.mark.parametrize("arch", sorted(REPDISTILLER))
def test_repdistiller_state_loads_strictly_and_computes_as_repdistiller(arch: str) -> None:
    family = FAMILY[arch]
    model = family.build(arch, 100, CIFAR).eval()
    source = _random_state(arch, 100)
    imported = family.import_state(arch, "repdistiller", source)
    ours = model.state_dict()
    assert set(imported) == set(ours)
    assert {key: tuple(value.shape) for key, value in imported.items()} == {
        key: tuple(value.shape) for key, value in ours.items()}
    model.load_state_dict(imported, strict=True)
    assert sorted(value.sum().item() for value in model.state_dict().values()) == pytest.approx(
        sorted(value.sum().item() for value in source.values()))

    images = torch.randn(2, *CIFAR)
    stage = LAST_STAGE[arch][0]
    with torch.no_grad(), FeatureTaps(model, ["stem", stage]) as tapped:
        logits, features = tapped(images)
        assert torch.allclose(features["stem"], _repdistiller_stem(arch, images, source), atol=1e-5)
        assert torch.allclose(logits, _repdistiller_head(arch, features[stage], source), atol=1e-5)


@pytest.mark.parametrize("family", [wrn, vgg_cifar, mobilenetv2_cifar, shufflenet_cifar, resnet_cifar])
def test_import_state_names_what_it_cannot_import(family: ModuleType) -> None:
    arch = next(iter(family.ARCHITECTURES))
    with pytest.raises(ValueError, match="allowed: repdistiller"):
        family.import_state(arch, "torchvision", {})
    with pytest.raises(ValueError, match="'features.0.weight'"):
        family.import_state(arch, "repdistiller", {"features.0.weight": torch.zeros(1)})

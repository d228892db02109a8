"""torchvision architectures and KD_wo_CE's small nets: counts, weight import, taps, input sizes.

Parameter counts and tap shapes run on the ``meta`` device (no memory, milliseconds); the
weight-import checks build real randomly initialised torchvision models, never download.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from models import small_nets, torchvision_nets
from models.registry import parameter_count
from models.taps import FeatureTaps

ARCHS = sorted(torchvision_nets.ARCHITECTURES)
ALL_ARCHS = ARCHS + sorted(small_nets.ARCHITECTURES)
SLOW_IMPORTS = {"resnet101", "vgg11_bn", "vgg19_bn", "vit_b_16"}


def _build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    family = torchvision_nets if arch in torchvision_nets.ARCHITECTURES else small_nets
    return family.build(arch, num_classes, image_shape)


def _random_torchvision(arch: str, **kwargs) -> nn.Module:
    """torchvision's own network, randomly initialised; the ViT head (zeros in torchvision) made
    random too so equal logits mean something."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    if arch == "vit_b_16":
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def _imported(arch: str, state: dict[str, Tensor], image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Ours built on meta and given the imported tensors (strict: every key, no extras)."""
    with torch.device("meta"):
        model = _build(arch, num_classes, image_shape)
    model.load_state_dict(torchvision_nets.import_state(arch, "torchvision", state, image_shape), strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_equals_torchvision_at_imagenet_size(arch):
    with torch.device("meta"):
        ours = _build(arch, 1000, (3, 224, 224))
        theirs = getattr(torchvision.models, arch)(weights=None)
    assert parameter_count(ours) == parameter_count(theirs)


def test_resnet50_on_cifar_matches_crd_count():
    # CRD's CIFAR-100 ResNet50 (RepDistiller models/resnetv2.py): 23.71M parameters.
    with torch.device("meta"):
        model = _build("resnet50", 100, (3, 32, 32))
    assert abs(parameter_count(model) - 23.71e6) / 23.71e6 < 0.01
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert isinstance(model.stem[3], nn.Identity)


@pytest.mark.parametrize(
    "arch", [pytest.param(arch, marks=pytest.mark.slow) if arch in SLOW_IMPORTS else arch for arch in ARCHS]
)
def test_torchvision_state_imports_strictly_with_equal_logits(arch):
    theirs = _random_torchvision(arch)
    ours = _imported(arch, theirs.state_dict(), (3, 224, 224), 1000)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_small_resnet_import_reinitialises_only_the_stem_conv():
    theirs = _random_torchvision("resnet18").state_dict()
    state = torchvision_nets.import_state("resnet18", "torchvision", theirs, (3, 32, 32))
    assert state["stem.0.weight"].shape == (64, 3, 3, 3)
    assert state["layer3.1.conv2.weight"] is theirs["layer3.1.conv2.weight"]
    assert state["fc.weight"] is theirs["fc.weight"]
    with torch.device("meta"):
        model = _build("resnet18", 1000, (3, 32, 32))
    model.load_state_dict(state, strict=True, assign=True)


def test_small_vgg_import_folds_the_classifier_exactly():
    # On a 32 px image torchvision's 7x7 average pool copies the 1x1 map 49 times; summing the first
    # Linear's weights over those positions gives the same logits from a global pool.
    theirs = _random_torchvision("vgg11_bn")
    ours = _imported("vgg11_bn", theirs.state_dict(), (3, 32, 32), 1000)
    assert ours.fc[0].in_features == 512
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-4, atol=1e-5)


def test_small_vit_import_resizes_patch_kernel_and_position_grid():
    state = _random_torchvision("vit_b_16").state_dict()
    ours = torchvision_nets.import_state("vit_b_16", "torchvision", state, (3, 32, 32))
    kernel, positions = ours["stem.conv_proj.weight"], ours["stem.pos_embedding"]
    assert kernel.shape == (768, 3, 4, 4) and positions.shape == (1, 1 + 8 * 8, 768)
    torch.testing.assert_close(kernel[:, :, 0, 0], state["conv_proj.weight"][:, :, :4, :4].mean((-1, -2)))
    # The class token's embedding is torchvision's first, untouched; the grid's corners stay put.
    torch.testing.assert_close(positions[:, 0], state["encoder.pos_embedding"][:, 0])
    torch.testing.assert_close(positions[:, 1], state["encoder.pos_embedding"][:, 1])
    torch.testing.assert_close(positions[:, -1], state["encoder.pos_embedding"][:, -1])
    with torch.device("meta"):
        model = _build("vit_b_16", 1000, (3, 32, 32))
    model.load_state_dict(ours, strict=True, assign=True)


def test_repdistiller_resnet_state_renames_into_the_cifar_stem():
    with torch.device("meta"):
        ours = _build("resnet18", 100, (3, 32, 32)).state_dict()
    # RepDistiller's resnetv2 names: conv1/bn1 at the top, shortcut for the projection, linear.
    renames = (("stem.0.", "conv1."), ("stem.1.", "bn1."), ("fc.", "linear."), (".downsample.", ".shortcut."))
    repdistiller = {}
    for key, tensor in ours.items():
        for old, new in renames:
            key = new + key[len(old):] if key.startswith(old) else key.replace(".downsample.", ".shortcut.")
        repdistiller[key] = tensor
    assert "layer2.0.shortcut.0.weight" in repdistiller and "conv1.weight" in repdistiller
    assert torchvision_nets.import_state("resnet18", "repdistiller", repdistiller, (3, 32, 32)).keys() == ours.keys()
    with pytest.raises(ValueError, match="under 64 px"):
        torchvision_nets.import_state("resnet18", "repdistiller", repdistiller, (3, 224, 224))


@pytest.mark.parametrize(
    ("arch", "source", "message"),
    [("vgg19_bn", "repdistiller", "allowed: torchvision$"), ("resnet34", "timm", "allowed: torchvision, repdistiller")],
)
def test_unknown_sources_are_refused(arch, source, message):
    with pytest.raises(ValueError, match=message):
        torchvision_nets.import_state(arch, source, {})


def test_foreign_keys_are_refused():
    with pytest.raises(ValueError, match="'linear.weight' is not a key of torchvision's resnet18"):
        torchvision_nets.import_state("resnet18", "torchvision", {"linear.weight": torch.zeros(1)})


def _meta_taps(arch: str, image_shape: tuple[int, int, int]) -> dict:
    with torch.device("meta"):
        model = _build(arch, 10, image_shape).eval()
        images = torch.empty(2, *image_shape)
    family = torchvision_nets if arch in torchvision_nets.ARCHITECTURES else small_nets
    with torch.no_grad(), FeatureTaps(model, family.ARCHITECTURES[arch]["taps"]) as tapped:
        logits, features = tapped(images)
    assert logits.shape == (2, 10)
    return {tap: tuple(feature.shape) for tap, feature in features.items()}


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_declared_tap_runs_on_small_inputs(arch, side):
    shapes = _meta_taps(arch, (3, side, side))
    assert len(shapes["pool"]) == 2
    assert all(len(shape) == 4 for tap, shape in shapes.items() if tap != "pool")
    if arch.startswith("vit"):
        width = shapes["pool"][1]
        assert all(shape == (2, width, 8, 8) for tap, shape in shapes.items() if tap != "pool")


def test_small_stems_follow_the_input_size():
    assert _meta_taps("resnet34", (3, 32, 32))["layer1"] == (2, 64, 32, 32)
    assert _meta_taps("resnet34", (3, 64, 64))["layer1"] == (2, 64, 32, 32)
    assert _meta_taps("resnet34", (3, 224, 224))["layer1"] == (2, 64, 56, 56)
    assert _meta_taps("mobilenet_v2", (3, 32, 32))["layer1"] == (2, 24, 16, 16)
    assert _meta_taps("mobilenet_v2", (3, 64, 64))["layer1"] == (2, 24, 16, 16)
    assert _meta_taps("vgg19_bn", (3, 32, 32))["layer4"] == (2, 512, 2, 2)
    assert _meta_taps("vit_b_16", (3, 224, 224))["layer4"] == (2, 768, 14, 14)


def test_generalised_layers_do_not_depend_on_the_input_size():
    from models.taps import generalised_layers

    for arch in ("resnet18", "mobilenet_v2", "vgg11_bn", "vit_b_16"):
        with torch.device("meta"):
            small, large = _build(arch, 10, (3, 32, 32)), _build(arch, 10, (3, 224, 224))
        assert generalised_layers(small) == generalised_layers(large)


@pytest.mark.parametrize("arch", ["resnet9", "resnet18", "mobilenet_v2", "vit_tiny"])
def test_real_forward_on_cifar_size_with_grayscale_and_colour(arch):
    for channels in (1, 3):
        torch.manual_seed(0)
        model = _build(arch, 10, (channels, 32, 32)).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, channels, 32, 32))
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_builds_and_runs_at_its_min_image_size(arch):
    family = torchvision_nets if arch in torchvision_nets.ARCHITECTURES else small_nets
    side = family.ARCHITECTURES[arch]["min_image_size"]
    _meta_taps(arch, (3, side, side))


def test_vit_refuses_non_square_or_undividable_inputs():
    with pytest.raises(ValueError, match="square input"):
        torchvision_nets.build("vit_b_16", 10, (3, 32, 48))
    with pytest.raises(ValueError, match="square input"):
        small_nets.build("vit_tiny", 10, (3, 36, 36))


class _Doubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.seen: list[str] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def tap_view(self, module_name: str, output: Tensor) -> Tensor:
        self.seen.append(module_name)
        return output * 2


def test_tap_view_sees_every_captured_output():
    model = _Doubling()
    images = torch.randn(4, 3)
    with FeatureTaps(model, ["body", 0]) as tapped:
        logits, features = tapped(images)
    torch.testing.assert_close(features["body"], logits * 2)
    torch.testing.assert_close(features[0], logits * 2)
    assert model.seen == ["body", "body"]


def test_vit_tap_is_the_block_output_as_a_map_without_the_class_token():
    torch.manual_seed(0)
    model = small_nets.build("vit_tiny", 10, (3, 32, 32)).eval()
    raw = {}
    model.layer2.register_forward_hook(lambda module, inputs, output: raw.setdefault("layer2", output))
    with torch.no_grad(), FeatureTaps(model, ["layer2", "pool"]) as tapped:
        _, features = tapped(torch.randn(2, 3, 32, 32))
    tokens = raw["layer2"]
    assert tokens.shape == (2, 65, 192) and features["layer2"].shape == (2, 192, 8, 8)
    # Patch (row 1, column 2) is token 1 + 1 * 8 + 2.
    torch.testing.assert_close(features["layer2"][:, :, 1, 2], tokens[:, 1 + 8 + 2])
    assert features["pool"].shape == (2, 192)

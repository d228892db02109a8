"""torchvision's ResNets, MobileNetV2, VGG-BN and ViT-B/16, rewired into the kdbench naming contract.

Each network is torchvision's own (no weights) with its submodules moved under the root children
``stem``, ``layer1`` .. ``layer4``, ``pool`` and ``fc``, so a tap like ``"layer2"`` means the same
thing here as on the CIFAR ResNets. Stage outputs are the features RepDistiller taps: post-ReLU
block outputs for the ResNets and VGGs (VGG's max-pool opens the next stage, as RepDistiller's
``pool_k`` follows ``f_k``), and the ends of RepDistiller's MobileNetV2 block groups.

The input size picks the stem, following the feature-only KD paper's code (KD_wo_CE,
Scripts/Arch/Templates/ImageTrainer.py ``LoadModel``) and CRD's CIFAR ResNet50:

* ResNets: under 64 px a 3x3 stride-1 conv and no max-pool (CIFAR, = RepDistiller resnetv2);
  64-127 px the 3x3 conv and torchvision's max-pool (KD_wo_CE on Tiny-ImageNet); from 128 px
  torchvision's 7x7 stride-2 stem. The no-max-pool slot holds ``nn.Identity`` so the generalised
  layers are the same at every size.
* MobileNetV2: its first conv has stride 1 under 64 px (KD_wo_CE: stride 2 only above 32 px).
* VGG: under 128 px a global average pool and a 512-input first classifier Linear (KD_wo_CE's
  CIFAR/Tiny-ImageNet VGG); from 128 px torchvision's 7x7 pool and 25088-input Linear.
* ViT: under 128 px the patch is side / 8, an 8x8 token grid (KD_wo_CE: patch 4 at 32 px, 8 at
  64 px); from 128 px patch 16. Inputs must be square with a side divisible by the patch.

``import_state`` renames torchvision's keys to ours and adapts what the input size changed, as
KD_wo_CE does when it fine-tunes ImageNet teachers on small images (see its docstring).

torchvision is imported inside the functions that build its networks: its import loads its C
extension, 160 MB of resident memory that every stage would pay, CIFAR ones included.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional

if TYPE_CHECKING:
    import torchvision

ARCHITECTURES = {
    "resnet18": {"kind": "resnet", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 8},
    "resnet34": {"kind": "resnet", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 8},
    "resnet50": {"kind": "resnet", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 8},
    "resnet101": {"kind": "resnet", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 8},
    "mobilenet_v2": {"kind": "mobilenet", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 8},
    # Five 2x2 max-pools: 32 px is the smallest input that keeps a 1x1 map.
    "vgg11_bn": {"kind": "vgg", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 32},
    "vgg19_bn": {"kind": "vgg", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 32},
    # ViT-B: 12 blocks, 12 heads, width 768, MLP 3072; 4 stages of 3 blocks.
    "vit_b_16": {"kind": "vit", "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 32},
}

SMALL_STEM_BELOW = 64
"""Sides under this get the stride-1 stem with no down-sampling (CIFAR)."""
IMAGENET_STEM_FROM = 128
"""Sides from this up get torchvision's ImageNet stem, VGG pool and ViT patch 16."""


class StagedNetwork(nn.Module):
    """Runs its children in registration order: stem, layer1 .. layerK, pool, fc."""

    def __init__(self, parts: OrderedDict[str, nn.Module]):
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, x: Tensor) -> Tensor:
        for part in self.children():
            x = part(x)
        return x


class _Tokens(nn.Module):
    """A ViT's input end: patch conv, class token first, learned position embedding, dropout
    (torchvision's ``_process_input`` + the start of ``Encoder.forward``, in the same order)."""

    def __init__(self, vit: torchvision.models.VisionTransformer):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, images: Tensor) -> Tensor:
        patches = self.conv_proj(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(images), -1, -1), patches], dim=1)
        return self.dropout(tokens + self.pos_embedding)


class _ClassToken(nn.Module):
    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]


class StagedViT(StagedNetwork):
    """A ViT whose token-sequence taps read as feature maps (see ``tap_view``)."""

    def __init__(self, parts: OrderedDict[str, nn.Module], grid: int):
        super().__init__(parts)
        self.grid = grid

    def tap_view(self, module_name: str, output: Tensor) -> Tensor:
        """(N, 1 + h*w, D) token outputs -> (N, D, h, w) with the class token dropped, so feature
        methods written for CNN maps apply; anything else (pool's (N, D) class token) unchanged."""
        if not isinstance(output, Tensor) or output.dim() != 3 or output.shape[1] != 1 + self.grid**2:
            return output
        patches = output[:, 1:]
        return patches.transpose(1, 2).reshape(len(output), output.shape[2], self.grid, self.grid)


def _side(image_shape: tuple[int, int, int]) -> int:
    return min(image_shape[1:])


def _no_inplace(model: nn.Module) -> nn.Module:
    """torchvision's activations run in place, which would overwrite the tapped output of the
    module before them (a BN's); taps need every module's own output kept."""
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def _conv_like(conv: nn.Conv2d, in_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    """A replacement for torchvision's first conv, Kaiming-initialised as torchvision's CNNs are."""
    new = nn.Conv2d(in_channels, conv.out_channels, kernel, stride, kernel // 2, bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def wrap_resnet(net: torchvision.models.ResNet, image_shape: tuple[int, int, int]) -> StagedNetwork:
    """Any torchvision ResNet in the contract, with the stem chosen from ``image_shape``."""
    side, channels = _side(image_shape), image_shape[0]
    if side < IMAGENET_STEM_FROM:
        net.conv1 = _conv_like(net.conv1, channels, kernel=3, stride=1)
        if side < SMALL_STEM_BELOW:
            net.maxpool = nn.Identity()
    elif channels != net.conv1.in_channels:
        net.conv1 = _conv_like(net.conv1, channels, kernel=7, stride=2)
    parts = OrderedDict(
        stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4,
        pool=nn.Sequential(net.avgpool, nn.Flatten()), fc=net.fc,
    )
    return _no_inplace(StagedNetwork(parts))


def _wrap_mobilenet(net: torchvision.models.MobileNetV2, image_shape: tuple[int, int, int]) -> StagedNetwork:
    """Stages end where RepDistiller's MobileNetV2 takes f1..f4 (after its block groups 1, 2, 4
    and 6); the last 1x1 conv to 1280 channels goes into ``pool`` as RepDistiller's f4 precedes it."""
    side, channels = _side(image_shape), image_shape[0]
    first = net.features[0][0]
    stride = 1 if side < SMALL_STEM_BELOW else 2
    if stride != first.stride[0] or channels != first.in_channels:
        net.features[0][0] = _conv_like(first, channels, kernel=3, stride=stride)
    blocks = list(net.features)
    parts = OrderedDict(
        stem=blocks[0],
        layer1=nn.Sequential(*blocks[1:4]), layer2=nn.Sequential(*blocks[4:7]),
        layer3=nn.Sequential(*blocks[7:14]), layer4=nn.Sequential(*blocks[14:18]),
        pool=nn.Sequential(blocks[18], nn.AdaptiveAvgPool2d(1), nn.Flatten()), fc=net.classifier,
    )
    return _no_inplace(StagedNetwork(parts))


def _wrap_vgg(net: torchvision.models.VGG, image_shape: tuple[int, int, int]) -> StagedNetwork:
    """stem = the first conv block; layer k = max-pool k then conv block k + 1; pool = the last
    max-pool and the average pool, global under 128 px (KD_wo_CE), else torchvision's 7x7."""
    side, channels = _side(image_shape), image_shape[0]
    if channels != net.features[0].in_channels:
        net.features[0] = _conv_like(net.features[0], channels, kernel=3, stride=1)
    if side < IMAGENET_STEM_FROM:
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        first = net.classifier[0]
        net.classifier[0] = nn.Linear(first.in_features // 49, first.out_features)
        nn.init.normal_(net.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(net.classifier[0].bias)
    groups: list[list[nn.Module]] = [[]]
    for module in net.features:
        if isinstance(module, nn.MaxPool2d):
            groups.append([])
        groups[-1].append(module)
    last_pool = groups.pop()
    stages = OrderedDict((f"layer{index}", nn.Sequential(*group)) for index, group in enumerate(groups[1:], start=1))
    parts = OrderedDict(
        stem=nn.Sequential(*groups[0]), **stages,
        pool=nn.Sequential(*last_pool, net.avgpool, nn.Flatten()), fc=net.classifier,
    )
    return _no_inplace(StagedNetwork(parts))


def vit_patch_size(image_shape: tuple[int, int, int]) -> int:
    """Patch side for a square input: an 8x8 token grid under 128 px (KD_wo_CE), else 16."""
    channels, height, width = image_shape
    patch = 16 if height >= IMAGENET_STEM_FROM else height // 8
    if height != width or patch == 0 or height % (patch if patch == 16 else 8):
        raise ValueError(
            f"a ViT needs a square input whose side divides into patches (8x8 grid under {IMAGENET_STEM_FROM} px, "
            f"patch 16 from there), got image_shape {tuple(image_shape)}"
        )
    return patch


def vit_network(image_shape: tuple[int, int, int], num_classes: int, depth: int, heads: int, width: int,
                mlp: int) -> torchvision.models.VisionTransformer:
    """torchvision's VisionTransformer sized for ``image_shape`` (patch from ``vit_patch_size``)."""
    from torchvision.models import VisionTransformer  # see the module docstring: imported when used

    return VisionTransformer(
        image_size=image_shape[1], patch_size=vit_patch_size(image_shape), num_layers=depth, num_heads=heads,
        hidden_dim=width, mlp_dim=mlp, num_classes=num_classes,
    )


def wrap_vit(net: torchvision.models.VisionTransformer, image_shape: tuple[int, int, int]) -> StagedViT:
    """A torchvision ViT in the contract: its blocks in 4 equal stages, pool = final LayerNorm and
    the class token (torchvision's head reads it; KD_wo_CE's configs average the tokens instead)."""
    patch = net.patch_size
    if image_shape[0] != net.conv_proj.in_channels:
        net.conv_proj = nn.Conv2d(image_shape[0], net.hidden_dim, patch, patch)
        nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / (image_shape[0] * patch * patch)))
        nn.init.zeros_(net.conv_proj.bias)
    blocks = list(net.encoder.layers)
    per_stage = len(blocks) // 4
    stages = OrderedDict(
        (f"layer{index + 1}", nn.Sequential(*blocks[index * per_stage:(index + 1) * per_stage])) for index in range(4)
    )
    parts = OrderedDict(stem=_Tokens(net), **stages, pool=nn.Sequential(net.encoder.ln, _ClassToken()), fc=net.heads)
    return _no_inplace(StagedViT(parts, grid=net.image_size // patch))


_WRAPPERS = {"resnet": wrap_resnet, "mobilenet": _wrap_mobilenet, "vgg": _wrap_vgg, "vit": wrap_vit}


def build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The network named ``arch`` in ``ARCHITECTURES`` for images of ``image_shape``; the registry calls this."""
    kind = ARCHITECTURES[arch]["kind"]
    if kind == "vit":
        net = vit_network(image_shape, num_classes, depth=12, heads=12, width=768, mlp=3072)
    else:
        from torchvision import models  # see the module docstring: imported when used

        net = getattr(models, arch)(weights=None, num_classes=num_classes)
    return _WRAPPERS[kind](net, tuple(image_shape))


IMAGENET_SHAPE = (3, 224, 224)


@lru_cache(maxsize=None)
def _torchvision_keys(arch: str) -> dict[str, str]:
    """torchvision state-dict key -> ours, found by identity: our wrapper holds torchvision's own
    parameter and buffer objects, so wrapping one (on ``meta``, at 224 px) pairs every key exactly.
    The names do not depend on the input size: a replaced module takes the old one's place."""
    from torchvision import models  # see the module docstring: imported when used

    with torch.device("meta"):
        net = getattr(models, arch)(weights=None)
        theirs = net.state_dict(keep_vars=True)
        ours = _WRAPPERS[ARCHITECTURES[arch]["kind"]](net, IMAGENET_SHAPE)
    by_id = {id(tensor): name for name, tensor in ours.state_dict(keep_vars=True).items()}
    return {name: by_id[id(tensor)] for name, tensor in theirs.items()}


def import_state(arch: str, source: str, state: dict[str, Tensor],
                 image_shape: tuple[int, int, int] = IMAGENET_SHAPE) -> dict[str, Tensor]:
    """``state`` in ``source``'s key names, renamed to ours and fitted to the model for ``image_shape``.

    "torchvision": the state dict of ``torchvision.models.<arch>``. At ImageNet input sizes it is a
    pure rename (the same network, the same logits). Where a smaller input changed a shape, the
    tensor is adapted as KD_wo_CE does for its ImageNet-pretrained CIFAR/Tiny-ImageNet teachers:
    a ResNet's 3x3 stem conv is freshly Kaiming-initialised (KD_wo_CE ``_resnet``: the 7x7 kernel
    has no 3x3 counterpart); a ViT's patch kernel is average-pooled to the smaller patch and its
    position-embedding grid bilinearly resized (KD_wo_CE ``VisionTransformer.LoadWeights``; it
    treats the last token as the class token, we keep torchvision's first). VGG's first classifier
    Linear, which KD_wo_CE re-initialises, is folded instead: its weights summed over the 7x7
    positions, exactly what torchvision's 7x7 pool of a 1x1 map (32 px) feeds it. MobileNetV2 needs
    nothing. The classifier keeps the source's classes: a caller with other classes replaces it.
    "repdistiller": a CRD/RepDistiller CIFAR ResNet (models/resnetv2.py) state dict, ResNets only,
    into our ResNet built for inputs under 64 px (its 3x3 stem and no max-pool).
    """
    kind = ARCHITECTURES[arch]["kind"]
    if source == "torchvision":
        renamed = _rename_torchvision(arch, state)
    elif source == "repdistiller" and kind == "resnet":
        renamed = _rename_repdistiller(arch, state, image_shape)
    else:
        allowed = "torchvision, repdistiller" if kind == "resnet" else "torchvision"
        raise ValueError(f"{arch} cannot import {source!r} weights; allowed: {allowed}")
    return _fit(arch, source, renamed, tuple(image_shape))


def _rename_torchvision(arch: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    keys = _torchvision_keys(arch)
    unknown = [key for key in state if key not in keys]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a key of torchvision's {arch} ({len(unknown)} such keys); "
                         f"expected torchvision.models.{arch}(...).state_dict() names")
    return {keys[key]: tensor for key, tensor in state.items()}


def _rename_repdistiller(arch: str, state: dict[str, Tensor], image_shape: tuple[int, int, int]) -> dict[str, Tensor]:
    """RepDistiller's resnetv2 is torchvision's ResNet on a CIFAR stem, with its own names:
    conv1/bn1 (stem), ``shortcut`` (torchvision's ``downsample``) and ``linear`` (fc)."""
    if _side(image_shape) >= SMALL_STEM_BELOW:
        raise ValueError(f"RepDistiller {arch} checkpoints are CIFAR networks (3x3 stem, no max-pool); "
                         f"build {arch} for inputs under {SMALL_STEM_BELOW} px, got image_shape {tuple(image_shape)}")
    prefixes = {"conv1.": "stem.0.", "bn1.": "stem.1.", "linear.": "fc."}
    renamed = {}
    for key, tensor in state.items():
        head = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
        new = prefixes[head] + key[len(head):] if head else key.replace(".shortcut.", ".downsample.")
        renamed[new] = tensor
    return renamed


def _fit(arch: str, source: str, state: dict[str, Tensor], image_shape: tuple[int, int, int]) -> dict[str, Tensor]:
    classifiers = [key for key in state if key.startswith("fc.") and key.endswith("weight")]
    num_classes = state[classifiers[-1]].shape[0] if classifiers else 1000
    with torch.device("meta"):
        target = build(arch, num_classes, image_shape).state_dict()
    fitted = {}
    for key, tensor in state.items():
        wanted = target.get(key)
        if wanted is not None and wanted.shape != tensor.shape:
            tensor = _resize(arch, source, key, tensor, tuple(wanted.shape), image_shape)
        fitted[key] = tensor
    return fitted


def _resize(arch: str, source: str, key: str, tensor: Tensor, shape: tuple[int, ...],
            image_shape: tuple[int, int, int]) -> Tensor:
    kind = ARCHITECTURES[arch]["kind"]
    if kind == "resnet" and key == "stem.0.weight":
        fresh = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        return nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu")
    if kind == "vgg" and key == "fc.0.weight" and tensor.shape[1] == shape[1] * 49:
        return tensor.reshape(shape[0], shape[1], 49).sum(-1)
    if kind == "vit" and key == "stem.conv_proj.weight" and tensor.shape[:2] == shape[:2]:
        return functional.avg_pool2d(tensor, kernel_size=tensor.shape[-1] // shape[-1])
    if kind == "vit" and key == "stem.pos_embedding":
        old, new = math.isqrt(tensor.shape[1] - 1), math.isqrt(shape[1] - 1)
        grid = tensor[:, 1:].transpose(1, 2).reshape(1, -1, old, old)
        grid = functional.interpolate(grid, size=(new, new), mode="bilinear", align_corners=True)
        return torch.cat([tensor[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    raise ValueError(f"{arch}: {source} weight {key!r} has shape {tuple(tensor.shape)} but the model for "
                     f"image_shape {image_shape} needs {shape}; only the stem, VGG's first classifier and "
                     "ViT's patch/position tensors are adapted")

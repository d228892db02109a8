"""The students of the feature-only KD paper (KD_wo_CE): its ResNet9 and its tiny ViT.

``resnet9`` is KD_wo_CE's (Scripts/Arch/Models/Resnet.py ``resnet9``), not the DAWNBench/Myrtle
ResNet-9 (Page 2018) that shares the name: torchvision's ResNet with one BasicBlock per stage
(widths 64, 128, 256, 512), on the same input-size stems as models/torchvision_nets.py, and with
the last BN of every residual branch zero-initialised as KD_wo_CE's ResNet does when trained
from scratch.

``vit_tiny`` is KD_wo_CE's student "ViT_ETT" (Scripts/Arch/Templates/ImageTrainer.py): depth 8,
6 heads, width 192, MLP 576, no dropout, an 8x8 patch grid (patch 4 at 32 px, 8 at 64 px), built
from torchvision's VisionTransformer and staged like vit_b_16 (4 stages of 2 blocks).
"""
from __future__ import annotations

from torch import nn

from models.torchvision_nets import vit_network, wrap_resnet, wrap_vit

ARCHITECTURES = {
    "resnet9": {"taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 8},
    "vit_tiny": {"depth": 8, "heads": 6, "width": 192, "mlp": 576,
                 "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool"], "min_image_size": 32},
}


def build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The network named ``arch`` in ``ARCHITECTURES`` for images of ``image_shape``; the registry calls this."""
    image_shape = tuple(image_shape)
    if arch == "resnet9":
        from torchvision.models.resnet import BasicBlock, ResNet  # imported when used, as in torchvision_nets

        net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, zero_init_residual=True)
        return wrap_resnet(net, image_shape)
    entry = ARCHITECTURES[arch]
    net = vit_network(image_shape, num_classes, entry["depth"], entry["heads"], entry["width"], entry["mlp"])
    return wrap_vit(net, image_shape)

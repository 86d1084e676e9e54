"""ResNet-18/50 with torchvision's exact state_dict layout (v1.5: stride on the 3x3 conv), plus a CIFAR stem and a
width multiplier.

Keys and shapes match `torchvision.models.resnet*`, so weights move between the two with `strict=True`. With
`width=w` every channel count c becomes int(c w) (truncated): SlimCLR's sub-networks and SwAV's wide ResNet-50s.
"""

from functools import partial
from typing import List, Optional, Type, Union

import torch
import torch.nn as nn


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, c_out: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, c_out), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, c_out: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1, self.bn1 = conv1x1(c_in, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)  # v1.5: stride here
        self.conv3, self.bn3 = conv1x1(planes, c_out), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk. `forward` returns fc(pooled features); with num_classes=0 fc is Identity -> [B, num_features].
    width: every channel count c is int(c width)."""

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: List[int],
        num_classes: int = 0,
        cifar_stem: bool = False,
        zero_init_residual: bool = False,
        width: float = 1.0,
    ):
        super().__init__()
        self.c_in, self.width = int(64 * width), width
        if cifar_stem:  # 32x32 inputs: 3x3 stride-1 conv and no max-pool keep the spatial resolution
            self.conv1 = nn.Conv2d(3, self.c_in, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, self.c_in, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(self.c_in)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.c_in
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual branch starts as zero, so every block starts as the identity
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """planes at width 1; every count is int(c width) of its full-size c."""
        mid, out = int(planes * self.width), int(planes * block.expansion * self.width)
        downsample = None
        if stride != 1 or self.c_in != out:
            downsample = nn.Sequential(conv1x1(self.c_in, out, stride), nn.BatchNorm2d(out))
        layers = [block(self.c_in, mid, out, stride, downsample)]
        self.c_in = out
        layers += [block(out, mid, out) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features before fc: [B, num_features]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


def resnet101(**kw) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kw)


def resnet18_cifar(**kw) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], cifar_stem=True, **kw)


RESNETS = {"resnet18": resnet18, "resnet50": resnet50, "resnet101": resnet101, "resnet18-cifar": resnet18_cifar}
# SwAV's wide ResNet-50s (facebookresearch/swav src/resnet50.py, widen=2/4/5: every channel count times w)
RESNETS.update({f"resnet50w{w}": partial(resnet50, width=w) for w in (2, 4, 5)})

"""PyTorch definitions of the exportable networks, with parameter names matching the published weights.

Defined here rather than imported because PyPI's torchvision does not import
beside the CPU torch build this project uses, and because the EfficientNet-Lite
weights follow lukemelas/EfficientNet-PyTorch naming. Every model's forward
returns ``(embedding, logits)``: the global-average-pooled features before the
classifier, and the classifier output. Export-time only (needs torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------- ResNet (torchvision layout)


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():  # torchvision's initialisation, so random models behave like it
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        embedding = torch.flatten(self.avgpool(x), 1)
        return embedding, self.fc(embedding)


def build_resnet(params: Mapping[str, Any], num_classes: int) -> ResNet:
    blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
    return ResNet(blocks[params["block"]], list(params["layers"]), num_classes)


# ------------------------------------------------------- EfficientNet-Lite (lukemelas layout)

# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage, for Lite0 (as B0, no SE).
_LITE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon; torch's default 1e-5 would shift every activation
_BN_MOMENTUM = 0.01  # 1 - TensorFlow's 0.99 (irrelevant for inference, kept for fidelity)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding for a fixed input size.

    TF pads the extra pixel of a stride-2 convolution on the bottom/right, not
    symmetrically; getting this wrong shifts every feature map by half a pixel.
    The padding is fixed at construction because the exported model's spatial
    size is fixed (only the batch axis is dynamic).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        image_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel_size - image_size, 0)
        symmetric = pad % 2 == 0
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=pad // 2 if symmetric else 0,
            groups=groups,
            bias=False,
        )
        # left, right, top, bottom; applied by an explicit Pad only when the conv cannot do it
        self.same_padding = None if symmetric else (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding is not None:
            x = F.pad(x, self.same_padding)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite (the Lite variant), ReLU6 activations."""

    def __init__(
        self, in_filters: int, out_filters: int, expand: int, kernel: int, stride: int, image_size: int
    ) -> None:
        super().__init__()
        hidden = in_filters * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_filters, hidden, 1, image_size)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, image_size, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_filters, 1, math.ceil(image_size / stride))
        self._bn2 = _bn(out_filters)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and in_filters == out_filters

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem 32 and head 1280 fixed, no SE, ReLU6, TF "SAME" padding."""

    def __init__(
        self, width: float = 1.0, depth: float = 1.0, image_size: int = 224, num_classes: int = 1000
    ):
        super().__init__()
        size = image_size
        self._conv_stem = SameConv2d(3, 32, 3, size, stride=2)
        self._bn0 = _bn(32)
        size = math.ceil(size / 2)
        blocks: list[MBConvBlock] = []
        last = len(_LITE_STAGES) - 1
        for index, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(_LITE_STAGES):
            in_f = 32 if index == 0 else _round_filters(in_f, width)
            out_f = _round_filters(out_f, width)
            if index not in (0, last):  # the Lite variants do not deepen the first and last stage
                repeats = math.ceil(depth * repeats)
            for repeat in range(repeats):
                block_stride = stride if repeat == 0 else 1
                blocks.append(
                    MBConvBlock(in_f if repeat == 0 else out_f, out_f, expand, kernel, block_stride, size)
                )
                size = math.ceil(size / block_stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(out_f, 1280, 1, size)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        embedding = x.mean(dim=(2, 3))
        return embedding, self._fc(embedding)


def build_efficientnet_lite(params: Mapping[str, Any], num_classes: int) -> EfficientNetLite:
    return EfficientNetLite(
        width=float(params.get("width", 1.0)),
        depth=float(params.get("depth", 1.0)),
        image_size=int(params.get("image_size", 224)),
        num_classes=num_classes,
    )


BUILDERS: dict[str, Callable[[Mapping[str, Any], int], nn.Module]] = {
    "resnet": build_resnet,
    "efficientnet-lite": build_efficientnet_lite,
}


def build(architecture: str, params: Mapping[str, Any], num_classes: int = 1000) -> nn.Module:
    """A fresh (randomly initialised) network in eval mode."""
    try:
        builder = BUILDERS[architecture]
    except KeyError:
        raise KeyError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(BUILDERS))}"
        ) from None
    return builder(params, num_classes).eval()

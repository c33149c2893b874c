"""Reference backbones: plain ``nn.Module``s that accept any input resolution.

Each ends in adaptive pooling (or, for the MLP, resizes to a fixed grid) so progressive resizing
can feed smaller images than the ones the model was built for.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SimpleCNN", "ResNet", "MLP", "resnet20", "resnet18", "build_backbone", "BACKBONE_NAMES"]


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")


class SimpleCNN(nn.Module):
    """The reference tutorial's CNN: conv 32 - conv 64 - fc 128 - fc ``num_classes``.

    Two 3x3 conv + ReLU + 2x2 max-pool stages, then adaptive average pooling to ``pool_size``
    (7 reproduces the tutorial's 64x7x7 features at 28 px) so any resolution >= 4 px works.

    Example:
        >>> import torch
        >>> SimpleCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> SimpleCNN()(torch.zeros(2, 1, 12, 12)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, hidden: int = 128, pool_size: int = 7,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, hidden=hidden, pool_size=pool_size)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pool_size),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * pool_size * pool_size, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no max-pool) with adaptive pooling before the classifier.

    ``stage_blocks=(3, 3, 3), widths=(16, 32, 64)`` is ResNet-20 (He et al. 2016, CIFAR);
    ``(2, 2, 2, 2), (64, 128, 256, 512)`` is the CIFAR ResNet-18.

    Example:
        >>> import torch
        >>> resnet20()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        stage_blocks: tuple[int, ...] = (3, 3, 3),
        widths: tuple[int, ...] = (16, 32, 64),
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(stage_blocks) != len(widths) or not stage_blocks:
            raise ValueError(
                f"`stage_blocks` and `widths` must be non-empty and of equal length, got "
                f"{stage_blocks!r} and {widths!r}"
            )
        _check_positive(in_channels=in_channels, num_classes=num_classes)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(stage_blocks, widths)):
            for j in range(n):
                layers.append(_BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet20(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-20 for 32x32 images (0.27 M parameters)."""
    return ResNet((3, 3, 3), (16, 32, 64), in_channels, num_classes)


def resnet18(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """CIFAR-style ResNet-18 (11 M parameters)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), in_channels, num_classes)


class MLP(nn.Module):
    """Fully connected classifier. Inputs of any resolution are resized to ``input_size`` first.

    Example:
        >>> import torch
        >>> MLP(input_size=8)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        hidden: tuple[int, ...] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        self.input_size = input_size
        dims = [in_channels * input_size * input_size, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.adaptive_avg_pool2d(x, self.input_size)
        return self.net(x)


#: Registry names -> constructors (classes and functions, never instances). Every constructor takes
#: ``in_channels`` and ``num_classes``; the rest are its own keyword arguments.
_BACKBONES = {"simple_cnn": SimpleCNN, "resnet20": resnet20, "resnet18": resnet18, "mlp": MLP}
BACKBONE_NAMES = tuple(_BACKBONES)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by registry name (``simple_cnn``, ``resnet20``, ``resnet18``, ``mlp``).

    Example:
        >>> type(build_backbone("mlp", in_channels=1, num_classes=10, hidden=(32,))).__name__
        'MLP'
    """
    if not isinstance(name, str) or name not in _BACKBONES:
        raise ValueError(f"`name` must be one of {', '.join(map(repr, BACKBONE_NAMES))}, got {name!r}")
    return _BACKBONES[name](**kwargs)

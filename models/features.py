"""Backbone + patch embedding: images in, patch features out. Run once per image, shared by every fold."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from models.backbones import Backbone, build_backbone
from models.config import PatchCoreConfig
from models.embedding import embed_patches
from models.images import to_batch


def default_forward_chunk(device: torch.device) -> int | None:
    """Images per backbone forward pass: the whole batch on a GPU, a few images per pass on a CPU.

    On a CPU the activations of the first layers of a whole batch do not fit in the caches: measured on
    the 2-core dev machine (Lite0, 224 px, ``bench/bench_scoring.py --forward-chunk``), 32 images in one
    pass cost 39 ms per image and 2 images per pass 11 ms, with bit-identical embeddings. One image per
    intra-op thread (at least 2) keeps every core busy while the working set stays in cache.
    """
    if device.type != "cpu":
        return None
    return max(2, torch.get_num_threads())


class PatchFeatureExtractor:
    """Turns PIL images into PatchCore patch embeddings ``(n_images, h, w, embed_dim)`` on CPU, float32.

    ``forward_chunk`` (images per backbone pass, ``None`` = the whole batch) is a speed setting, not part
    of the model: the embeddings are the same for any value (tested). Default: :func:`default_forward_chunk`.
    """

    def __init__(
        self,
        config: PatchCoreConfig,
        *,
        device: str | torch.device | None = "auto",
        forward_chunk: int | None = None,
    ) -> None:
        self.config = config
        self.backbone: Backbone = build_backbone(
            config.backbone, config.layers, weights_path=config.weights_path, device=device
        )
        if forward_chunk is not None and forward_chunk < 1:
            raise ValueError(f"forward_chunk must be >= 1, got {forward_chunk}")
        self.forward_chunk = forward_chunk or default_forward_chunk(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize and normalise with the backbone's own statistics: (n_images, 3, S, S)."""
        return to_batch(images, image_size=self.config.image_size, mean=self.backbone.mean, std=self.backbone.std)

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch → patch embeddings (n_images, h, w, embed_dim), float32 on CPU."""
        chunk = self.forward_chunk or len(batch)
        if len(batch) > chunk:
            return torch.cat([self.embed_batch(batch[begin : begin + chunk]) for begin in range(0, len(batch), chunk)])
        layer_features = self.backbone(batch)
        embedded = embed_patches(
            layer_features,
            patch_size=self.config.patch_size,
            target_dim=self.config.target_dim,
            align=self.config.align,
        )
        return embedded.float().cpu()

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_batch(self.preprocess(images))

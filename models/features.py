"""Backbone + patch embedding: images in, patch features out. Run once per image, shared by every fold."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from models.backbones import Backbone, build_backbone
from models.config import PatchCoreConfig
from models.embedding import embed_patches
from models.images import to_batch


class PatchFeatureExtractor:
    """Turns PIL images into PatchCore patch embeddings ``(n_images, h, w, embed_dim)`` on CPU, float32."""

    def __init__(self, config: PatchCoreConfig, *, device: str | torch.device | None = "auto") -> None:
        self.config = config
        self.backbone: Backbone = build_backbone(
            config.backbone, config.layers, weights_path=config.weights_path, device=device
        )

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize and normalise with the backbone's own statistics: (n_images, 3, S, S)."""
        return to_batch(images, image_size=self.config.image_size, mean=self.backbone.mean, std=self.backbone.std)

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch → patch embeddings (n_images, h, w, embed_dim), float32 on CPU."""
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

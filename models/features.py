"""Backbone + patch embedding: images in, patch features out. Run once per image, shared by every fold."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from models.backbones import Backbone, build_backbone
from models.config import PatchCoreConfig
from models.embedding import embed_patches
from models.images import to_batch
from models.tiling import TileLayout, cut_tiles, plan_tiles, stitch_grids


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
        self.layout: TileLayout = plan_tiles(config.tiles, config.image_size, config.tile_overlap, self._tile_cells())

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def input_size(self) -> int:
        """Side of the square every image is resized to (the tiled canvas; ``image_size`` without tiling)."""
        return self.layout.canvas

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of one image (rows, cols), tiles stitched."""
        return self.layout.grid

    @torch.inference_mode()
    def _tile_cells(self) -> tuple[int, int]:
        """Patch grid of one backbone input of ``image_size`` px, from one forward pass on a blank image."""
        size = self.config.image_size
        probe = torch.zeros(1, 3, size, size, device=self.device)
        embedded = self._embed_tiles(probe)
        return int(embedded.shape[1]), int(embedded.shape[2])

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize to the canvas and normalise with the backbone's own statistics: (n_images, 3, S, S) on the
        backbone's device (a GPU gets uint8 pixels and normalises them itself, :func:`to_batch`)."""
        return to_batch(
            images, image_size=self.input_size, mean=self.backbone.mean, std=self.backbone.std, device=self.device
        )

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed canvases → patch embeddings (n_images, rows, cols, embed_dim), float32 on CPU.

        Tiled, each canvas is cut into its tiles, which go through the backbone together (in passes of
        ``forward_chunk``), and the tiles' grids are stitched back (:mod:`models.tiling`).
        """
        if self.layout.n_tiles == 1:
            return self._embed_tiles(batch)
        # One image's tiles at a time per pass group keeps memory bounded for huge canvases.
        per_pass = max(1, (self.forward_chunk or len(batch) * self.layout.n_tiles) // self.layout.n_tiles)
        parts = []
        for begin in range(0, len(batch), per_pass):
            tiles = cut_tiles(batch[begin : begin + per_pass], self.layout)
            parts.append(stitch_grids(self._embed_tiles(tiles), self.layout))
        return torch.cat(parts)

    @torch.inference_mode()
    def _embed_tiles(self, batch: torch.Tensor) -> torch.Tensor:
        """Backbone inputs of ``image_size`` px → their patch embeddings (n, h, w, embed_dim)."""
        chunk = self.forward_chunk or len(batch)
        if len(batch) > chunk:
            return torch.cat([self._embed_tiles(batch[begin : begin + chunk]) for begin in range(0, len(batch), chunk)])
        layer_features = self.backbone(batch)
        embedded = embed_patches(
            layer_features,
            patch_size=self.config.patch_size,
            target_dim=self.config.target_dim,
            align=self.config.align,
            layer_weighting=self.config.layer_weighting,
        )
        return embedded.float().cpu()

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_batch(self.preprocess(images))

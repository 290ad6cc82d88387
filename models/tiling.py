"""Tiling: high-resolution patch features with a backbone pass of bounded size.

Inspection images are often far larger than a backbone's native input and their defects a few pixels wide:
resized whole to 224 px, a 640 px DeepPCB frame scores near chance. Tiling resizes the image to a larger
square *canvas*, cuts it into ``tiles × tiles`` squares of ``image_size`` px, runs every tile through the same
backbone pass, and stitches the tiles' patch grids back into one grid over the whole canvas. Everything
downstream (coreset, banks, k-NN, eq. 7, maps, thresholds) then works on that grid as if the backbone had
seen the whole image at the canvas resolution, so an image's score is the maximum over its tiles' patches
and training images are cut exactly like scored ones.

Overlapping tiles are placed on whole patch cells, and where two tiles see the same cell their features
are averaged (a blend of the border effects of both tiles). The order of tiles is row-major: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.errors import ConfigError


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one image sit on the canvas, in pixels and in patch cells.

    ``tile_cells`` is the patch grid of one tile (h, w); ``cell_px`` the canvas pixels one cell spans.
    """

    tiles: int
    tile_size: int
    tile_cells: tuple[int, int]
    stride_cells: tuple[int, int]

    @property
    def cell_px(self) -> tuple[int, int]:
        return self.tile_size // self.tile_cells[0], self.tile_size // self.tile_cells[1]

    @property
    def stride_px(self) -> tuple[int, int]:
        return self.stride_cells[0] * self.cell_px[0], self.stride_cells[1] * self.cell_px[1]

    @property
    def canvas(self) -> int:
        """Side of the square canvas the image is resized to before cutting (== tile_size without tiling)."""
        return self.tile_size + (self.tiles - 1) * self.stride_px[0]

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of the stitched canvas (n_rows, n_cols)."""
        return (
            self.tile_cells[0] + (self.tiles - 1) * self.stride_cells[0],
            self.tile_cells[1] + (self.tiles - 1) * self.stride_cells[1],
        )

    @property
    def n_tiles(self) -> int:
        return self.tiles * self.tiles

    def offsets_px(self) -> list[tuple[int, int]]:
        """Top-left corner of each tile on the canvas, row-major."""
        sy, sx = self.stride_px
        return [(r * sy, c * sx) for r in range(self.tiles) for c in range(self.tiles)]

    def offsets_cells(self) -> list[tuple[int, int]]:
        sy, sx = self.stride_cells
        return [(r * sy, c * sx) for r in range(self.tiles) for c in range(self.tiles)]


def plan_tiles(tiles: int, tile_size: int, overlap: float, tile_cells: tuple[int, int]) -> TileLayout:
    """The layout for ``tiles`` per side of ``tile_size`` px overlapping by about ``overlap`` of a tile.

    The stride is rounded to whole patch cells (so stitched cells line up exactly) and is at least one cell.
    """
    if tiles < 1:
        raise ConfigError(f"tiles={tiles} must be >= 1")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"tile_overlap={overlap} must be in [0, 1)")
    height, width = tile_cells
    if tile_size % height or tile_size % width:
        raise ConfigError(
            f"image_size={tile_size} is not a whole number of patch cells ({height}x{width} per tile): "
            "choose an image size that the backbone's deepest tapped stride divides"
        )
    stride = (max(1, round(height * (1.0 - overlap))), max(1, round(width * (1.0 - overlap))))
    return TileLayout(tiles=tiles, tile_size=tile_size, tile_cells=(height, width), stride_cells=stride)


def cut_tiles(batch: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Canvas batch (n, c, canvas, canvas) → tiles (n · n_tiles, c, tile, tile), image-major, row-major."""
    n_images, channels, height, width = batch.shape
    if (height, width) != (layout.canvas, layout.canvas):
        raise ConfigError(f"canvas of {height}x{width} px does not match the tile layout's {layout.canvas} px")
    size = layout.tile_size
    tiles = [batch[:, :, y : y + size, x : x + size] for y, x in layout.offsets_px()]
    return torch.stack(tiles, dim=1).reshape(n_images * layout.n_tiles, channels, size, size)


def stitch_grids(tile_features: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """Tiles' patch features (n · n_tiles, h, w, d) → one grid per image (n, H, W, d), overlaps averaged."""
    total, height, width, dim = tile_features.shape
    if (height, width) != layout.tile_cells or total % layout.n_tiles:
        raise ConfigError(
            f"{total} tile grids of {height}x{width} do not fit a layout of {layout.n_tiles} tiles of "
            f"{layout.tile_cells}"
        )
    if layout.n_tiles == 1:
        return tile_features
    n_images = total // layout.n_tiles
    per_image = tile_features.reshape(n_images, layout.n_tiles, height, width, dim)
    rows, cols = layout.grid
    stitched = torch.zeros(n_images, rows, cols, dim, dtype=tile_features.dtype)
    counts = torch.zeros(rows, cols, 1, dtype=tile_features.dtype)
    for t, (y, x) in enumerate(layout.offsets_cells()):
        stitched[:, y : y + height, x : x + width] += per_image[:, t]
        counts[y : y + height, x : x + width] += 1
    return stitched / counts

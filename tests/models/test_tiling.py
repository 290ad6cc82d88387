"""Tiling: the layout, stitching, tiled embeddings against direct ones, and the max-over-tiles score."""

import numpy as np
import pytest
import torch
from PIL import Image

from bench.magnetic_tile import subsample
from models import FoldEnsemble, PatchCoreConfig, load_image_file
from models.errors import ConfigError
from models.features import PatchFeatureExtractor
from models.scoring import score_patches
from models.tiling import cut_tiles, plan_tiles, stitch_grids


def test_layout_without_overlap_tiles_the_canvas_edge_to_edge():
    layout = plan_tiles(4, 224, 0.0, (14, 14))
    assert layout.canvas == 896
    assert layout.grid == (56, 56)
    assert layout.cell_px == (16, 16)
    assert layout.offsets_px()[:5] == [(0, 0), (0, 224), (0, 448), (0, 672), (224, 0)]
    assert len(layout.offsets_px()) == 16


def test_overlap_is_rounded_to_whole_cells():
    layout = plan_tiles(3, 224, 0.25, (14, 14))
    assert layout.stride_cells == (10, 10)  # 14 · 0.75 = 10.5 → 10 cells of 16 px
    assert layout.stride_px == (160, 160)
    assert layout.canvas == 224 + 2 * 160
    assert layout.grid == (14 + 2 * 10, 14 + 2 * 10)


@pytest.mark.parametrize(("tiles", "overlap", "cells"), [(0, 0.0, (14, 14)), (2, 1.0, (14, 14)), (2, 0.0, (15, 15))])
def test_impossible_layouts_are_refused(tiles, overlap, cells):
    with pytest.raises(ConfigError):
        plan_tiles(tiles, 224, overlap, cells)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_stitching_the_tiles_of_a_grid_gives_the_grid_back(overlap):
    layout = plan_tiles(3, 8, overlap, (4, 4))  # 2 px per cell
    rows, cols = layout.grid
    grid = torch.randn(2, rows, cols, 5, generator=torch.Generator().manual_seed(0))
    tiles = torch.stack(
        [grid[i, y : y + 4, x : x + 4] for i in range(2) for y, x in layout.offsets_cells()]
    )  # image-major, row-major: the order cut_tiles produces
    assert torch.allclose(stitch_grids(tiles, layout), grid, atol=1e-6)


def test_overlapping_cells_average_their_tiles():
    layout = plan_tiles(2, 8, 0.5, (4, 4))  # stride 2 cells: the middle two columns/rows are shared
    tiles = torch.stack([torch.full((4, 4, 1), float(t)) for t in range(4)])
    stitched = stitch_grids(tiles, layout)[0, :, :, 0]
    assert stitched.shape == (6, 6)
    assert stitched[0, 0] == 0 and stitched[0, 5] == 1 and stitched[5, 0] == 2 and stitched[5, 5] == 3
    assert stitched[0, 2] == pytest.approx(0.5)  # tiles 0 and 1
    assert stitched[2, 2] == pytest.approx(1.5)  # all four tiles


def test_cut_tiles_cuts_row_major_squares():
    layout = plan_tiles(2, 4, 0.0, (2, 2))
    canvas = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    tiles = cut_tiles(canvas, layout)
    assert tiles.shape == (8, 1, 4, 4)
    assert torch.equal(tiles[1], canvas[0, :, 0:4, 4:8])
    assert torch.equal(tiles[6], canvas[1, :, 4:8, 0:4])


def test_tiled_embedding_of_a_tile_equals_the_tile_embedded_alone(tile_split):
    image = load_image_file(tile_split.test_bad[0].path)
    tiled = PatchFeatureExtractor(PatchCoreConfig(tiles=2), device="cpu")
    plain = PatchFeatureExtractor(PatchCoreConfig(), device="cpu")
    assert tiled.input_size == 448
    assert tiled.grid == (28, 28)
    embedded = tiled.embed([image])
    assert embedded.shape == (1, 28, 28, 152)
    canvas = image.resize((448, 448), Image.Resampling.BILINEAR)
    bottom_right = plain.embed([canvas.crop((224, 224, 448, 448))])
    assert torch.allclose(embedded[:, 14:, 14:], bottom_right, atol=1e-5)


def test_tiled_image_score_is_the_max_over_its_tiles(tile_split):
    refs = subsample(tile_split.train, 10)
    config = PatchCoreConfig(tiles=2, folds=2, coreset_ratio=0.05, reweight=False)
    ensemble = FoldEnsemble.fit([r.id for r in refs], [r.path for r in refs], config, device="cpu")
    image = load_image_file(tile_split.test_bad[3].path)
    result = ensemble.score_images([image], ["bad"])[0]
    assert result.anomaly_map.shape == (448, 448)
    grid = ensemble.extractor.embed([image])[0].numpy()
    for f, fold in enumerate(ensemble.folds):
        quarters = [grid[y : y + 14, x : x + 14].reshape(1, -1, grid.shape[-1]) for y in (0, 14) for x in (0, 14)]
        per_tile = [score_patches(fold.bank, q.astype(np.float16).astype(np.float32), config)[0][0] for q in quarters]
        assert result.fold_scores[f] == pytest.approx(max(per_tile), rel=1e-5)

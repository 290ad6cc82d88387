"""The stored anomaly map: small, and what it renders is the overlay the worker used to store."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.heatmap import STORED_MAP_SIZE, StoredMap, decode_map, encode_map, heatmap_png, render_stored
from models.scoring import anomaly_maps


def _map(seed: int = 0) -> np.ndarray:
    """A worst-case map: independent random patch scores on a 28² grid, upsampled and blurred as scored."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand((1, 28, 28), generator=generator) * 2.0
    return anomaly_maps(grid, 224, 4.0).numpy()[0]


def test_a_stored_map_is_a_small_grayscale_png_within_two_percent_of_the_map() -> None:
    anomaly_map = _map()
    stored = encode_map(anomaly_map)
    with Image.open(io.BytesIO(stored.png)) as image:
        assert image.mode == "L" and image.size == (STORED_MAP_SIZE, STORED_MAP_SIZE)
    assert len(stored.png) < 4000
    assert stored.low == pytest.approx(anomaly_map.min(), abs=0.02)
    assert stored.high == pytest.approx(anomaly_map.max(), abs=0.02)
    back = decode_map(stored, size=(224, 224))
    assert back.dtype == np.float32 and back.shape == (224, 224)
    span = float(anomaly_map.max() - anomaly_map.min())
    assert float(np.abs(back - anomaly_map).max()) < 0.02 * span


def test_a_flat_map_round_trips_to_its_value() -> None:
    stored = encode_map(np.full((224, 224), 0.37, dtype=np.float32))
    np.testing.assert_allclose(decode_map(stored, size=(10, 10)), 0.37, rtol=1e-6)


def test_a_small_map_is_stored_at_its_own_size() -> None:
    stored = encode_map(np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30))
    assert decode_map(stored).shape == (20, 30)
    assert isinstance(stored, StoredMap)


def test_the_rendered_overlay_looks_like_the_overlay_of_the_full_map() -> None:
    """Same size and colour scale as the overlay the worker stored before; pixels within a few levels."""
    anomaly_map = _map(1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    threshold = float(np.quantile(anomaly_map, 0.8))
    small = image.resize((224, 224), Image.Resampling.BILINEAR)
    before = np.asarray(Image.open(io.BytesIO(heatmap_png(small, anomaly_map, threshold=threshold))), dtype=float)
    after = np.asarray(
        Image.open(io.BytesIO(render_stored(image, encode_map(anomaly_map), threshold=threshold, size=224))),
        dtype=float,
    )
    assert before.shape == after.shape
    assert np.abs(before - after).mean() < 2.0

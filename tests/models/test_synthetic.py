"""Synthetic anomalies: deterministic, exact masks, sizes of small real defects, ids not positions."""

import numpy as np
import pytest
from PIL import Image

from models import load_image_file
from models.synthetic import SYNTHETIC_KINDS, SyntheticAnomaly, synthesize_anomaly, synthetic_anomalies


def _textured(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def _line_art(size: int = 128) -> Image.Image:
    """Black-and-white stripes, like DeepPCB: a patch of background pasted on background changes nothing."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, ::16] = 255
    pixels[::24, :] = 255
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
@pytest.mark.parametrize("seed", range(8))
def test_mask_is_exactly_the_changed_pixels(kind, seed):
    image = _textured(seed)
    altered, mask = synthesize_anomaly(image, seed=seed, kind=kind, donor=_textured(100 + seed))
    before, after = np.asarray(image), np.asarray(altered)
    assert altered.mode == "RGB" and altered.size == image.size
    assert mask.dtype == bool and mask.shape == (image.height, image.width)
    assert mask.any()
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert np.all(np.any(after[mask] != before[mask], axis=-1))


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_same_seed_same_pixels_other_seed_other_pixels(kind):
    image = _textured(1)
    first = synthesize_anomaly(image, seed=7, kind=kind)
    again = synthesize_anomaly(image, seed=7, kind=kind)
    other = synthesize_anomaly(image, seed=8, kind=kind)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_constant_image_still_gets_a_defect():
    """The jitter shifts away from saturation, so even an all-black or all-white frame changes."""
    for value in (0, 255):
        for kind in SYNTHETIC_KINDS:
            _, mask = synthesize_anomaly(Image.new("RGB", (64, 48), (value,) * 3), seed=1, kind=kind)
            assert mask.any()


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_line_art_still_gets_a_visible_defect(kind):
    image = _line_art()
    for seed in range(10):
        _, mask = synthesize_anomaly(image, seed=seed, kind=kind)
        assert mask.sum() >= 4


def test_sizes_stay_those_of_small_defects():
    """Changed area at most a few % of the image (scale = 3% of the footprint bound), down to tiny."""
    image = _textured(3, (200, 160))
    fractions = [synthesize_anomaly(image, seed=s, scale=0.03)[1].mean() for s in range(60)]
    assert max(fractions) <= 0.05
    assert min(fractions) < 0.003
    assert np.median(fractions) > 0.001


def test_grayscale_input_gives_rgb_output():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8), mode="L")
    altered, mask = synthesize_anomaly(gray, seed=0, kind="cutpaste")
    assert altered.mode == "RGB" and mask.shape == (64, 64)


def test_bad_arguments_are_refused_with_the_option_name():
    image = _textured(0)
    with pytest.raises(ValueError, match="kind="):
        synthesize_anomaly(image, seed=0, kind="glitter")
    with pytest.raises(ValueError, match="scale="):
        synthesize_anomaly(image, seed=0, scale=0.0)
    with pytest.raises(ValueError, match="too small"):
        synthesize_anomaly(Image.new("RGB", (4, 32)), seed=0)
    with pytest.raises(ValueError, match="ids"):
        synthetic_anomalies([image], ["a", "b"], seed=0)


def test_anomalies_depend_on_ids_not_positions():
    images = [_textured(i) for i in range(5)]
    ids = [f"img{i}" for i in range(5)]
    forward = synthetic_anomalies(images, ids, seed=3)
    backward = synthetic_anomalies(images[::-1], ids[::-1], seed=3)
    assert all(isinstance(a, SyntheticAnomaly) for a in forward)
    assert [a.id for a in forward] == [f"{i}~{a.kind}" for i, a in zip(ids, forward, strict=True)]
    by_id = {a.id: a for a in backward}
    for anomaly in forward:
        twin = by_id[anomaly.id]
        np.testing.assert_array_equal(np.asarray(anomaly.image), np.asarray(twin.image))
        np.testing.assert_array_equal(anomaly.mask, twin.mask)
    # Another seed gives other defects; every kind is used over a handful of images.
    other = synthetic_anomalies(images, ids, seed=4)
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(forward, other, strict=True))
    kinds = {
        a.kind for a in synthetic_anomalies([_textured(i) for i in range(30)], [str(i) for i in range(30)], seed=0)
    }
    assert kinds == set(SYNTHETIC_KINDS)


def test_restricted_kinds():
    images = [_textured(i) for i in range(6)]
    anomalies = synthetic_anomalies(images, [str(i) for i in range(6)], seed=0, kinds=("scar",))
    assert {a.kind for a in anomalies} == {"scar"}
    with pytest.raises(ValueError, match="kinds="):
        synthetic_anomalies(images, [str(i) for i in range(6)], seed=0, kinds=("glitter",))


def test_on_real_nominal_images(tile_split):
    """Real magnetic tiles (grayscale, non-square, varying size): exact masks, every kind, sizes bounded."""
    refs = tile_split.train[:12]
    images = [load_image_file(ref.path) for ref in refs]
    anomalies = synthetic_anomalies(images, [ref.id for ref in refs], seed=0)
    for image, anomaly in zip(images, anomalies, strict=True):
        before, after = np.asarray(image), np.asarray(anomaly.image)
        np.testing.assert_array_equal(after[~anomaly.mask], before[~anomaly.mask])
        assert 0 < anomaly.mask.mean() <= 0.05

"""Bounded memory (issue 12, row 7): 16-bit images and concurrent decodes.

Eight 1.4 MB 16-bit 8000² PNGs took one pool process to 11.7 GB: each decode made float64 copies of the
whole image, and the eight decoded at once. Memory figures are printed by
``bench/bench_decode_memory.py``; these tests check the mechanisms, deterministically (no timing):

* 16-bit data is reduced to 8 bits with no full-size float copy (numpy's allocations, which tracemalloc
  sees), to exactly the values of the whole-image formula;
* decoding straight to the model's input size gives the pixels of decode-then-resize for ordinary images
  (so their scores do not change), and reduces large JPEGs in the decoder;
* a batch's decodes never hold more pixels at once than the budget (real scorer, real folder bucket,
  real SQLite and PostgreSQL), and every image is still scored.

Before the fix: the 16-bit decode traced ~24 bytes per pixel, ``decode_image`` had no ``size`` and the
worker had no decode budget.
"""

from __future__ import annotations

import io
import os
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy.orm import Session, sessionmaker

from models import FoldEnsemble
from models.images import decode_image, resize_for_model
from worker import repository
from worker.db import session_scope
from worker.decode_budget import PixelBudget, shared_budget
from worker.model_provider import LoadedModel
from worker.scoring import ScoringOptions, score_batch
from worker.storage import FolderStore

try:
    from end_state import image_states
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.end_state import image_states


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(array).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _sixteen_bit(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth 16-bit wafer-like field plus noise (compresses like a real scan, not like white noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    field = 20_000 + 8_000 * np.sin(x / 97.0) * np.cos(y / 131.0)
    return (field + rng.normal(0, 300, size=(height, width))).clip(0, 65_535).astype(np.uint16)


def test_sixteen_bit_is_reduced_to_eight_bits_without_a_full_size_float_copy() -> None:
    array = _sixteen_bit(2000, 2000, seed=1)
    data = _png(array)
    tracemalloc.start()
    try:
        image = decode_image(data, max_pixels=10_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pixels = 2000 * 2000
    assert peak < 4 * pixels, f"decoding traced {peak / pixels:.1f} bytes per pixel (one float64 copy is 8)"

    low, high = float(array.min()), float(array.max())
    expected = ((array.astype(np.float64) - low) / (high - low) * 255.0).round().astype(np.uint8)
    assert np.array_equal(np.asarray(image)[..., 0], expected)
    assert np.array_equal(np.asarray(image)[..., 0], np.asarray(image)[..., 2])


@pytest.mark.parametrize("kind", ["rgb-dacon", "gray", "sixteen-bit", "palette", "rgba"])
def test_decode_to_model_size_gives_the_pixels_of_decode_then_resize(kind: str, dacon_test_images: list[Path]) -> None:
    rng = np.random.default_rng(2)
    if kind == "rgb-dacon":
        data = dacon_test_images[0].read_bytes()
    elif kind == "gray":
        data = _png(rng.integers(0, 256, size=(700, 900), dtype=np.uint8))
    elif kind == "sixteen-bit":
        data = _png(_sixteen_bit(600, 800, seed=3))
    else:
        base = PILImage.open(dacon_test_images[1]).convert("RGB")
        if kind == "palette":
            image = base.convert("P")
        else:
            image = base.convert("RGBA")
            image.putalpha(PILImage.fromarray(rng.integers(0, 256, size=(512, 512), dtype=np.uint8)))
        out = io.BytesIO()
        image.save(out, format="PNG")
        data = out.getvalue()

    direct = decode_image(data, size=224)

    assert direct.size == (224, 224) and direct.mode == "RGB"
    assert np.array_equal(np.asarray(direct), np.asarray(resize_for_model(decode_image(data), 224)))


def test_a_large_jpeg_is_reduced_in_the_decoder_and_still_looks_the_same(dacon_test_images: list[Path]) -> None:
    large = PILImage.open(dacon_test_images[0]).convert("RGB").resize((4000, 4000), PILImage.Resampling.BICUBIC)
    out = io.BytesIO()
    large.save(out, format="JPEG", quality=95)
    data = out.getvalue()

    reduced = np.asarray(decode_image(data, size=224), dtype=np.float64)
    exact = np.asarray(resize_for_model(decode_image(data), 224), dtype=np.float64)

    assert reduced.shape == exact.shape == (224, 224, 3)
    assert np.abs(reduced - exact).mean() < 2.0  # of 255: the same picture, at a fraction of the memory


def test_an_image_larger_than_the_whole_budget_runs_alone_instead_of_waiting_forever() -> None:
    budget = PixelBudget(10)
    with budget.hold(25):
        assert budget.in_use == 25
    entered = threading.Event()
    release = threading.Event()

    def small() -> None:
        with budget.hold(4):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=small)
    thread.start()
    assert entered.wait(10)
    with budget.hold(6):  # 4 + 6 fit the budget of 10: no wait
        assert budget.in_use == 10
    release.set()
    thread.join(10)
    assert budget.in_use == 0 and budget.high_water == 25


def test_a_batch_of_large_sixteen_bit_images_holds_at_most_the_pixel_budget(
    session_factory: sessionmaker[Session], tmp_path: Path, pipeline_model_dir: Path
) -> None:
    ensemble = FoldEnsemble.load(pipeline_model_dir, device="cpu")
    with session_scope(session_factory) as session:
        repository.ensure_model_version(session, version=ensemble.version, status="active")
    model = LoadedModel(ensemble.version, ensemble, "pinned", time.time())
    store = FolderStore(tmp_path / "bucket", bucket="fab")
    store.ensure_bucket()
    keys = [f"incoming/poison/{index}.png" for index in range(8)]
    with session_scope(session_factory) as session:
        ids = []
        for index, key in enumerate(keys):
            info = store.put(key, _png(_sixteen_bit(1500, 1500, seed=10 + index)))
            ids.append(repository.register_image(session, bucket="fab", key=key, etag=info.etag, size=info.size)[0].id)
    capacity = 2 * 1500 * 1500 + 17  # two images at a time; a capacity no other test uses
    options = ScoringOptions(fetch_threads=8, decode_pixel_budget=capacity)

    result = score_batch(ids, session_factory=session_factory, store=store, model=model, options=options)

    assert sorted(result.scored) == sorted(ids)
    budget = shared_budget(capacity)
    assert budget.in_use == 0
    assert 1500 * 1500 <= budget.high_water <= capacity
    with session_scope(session_factory) as session:
        assert image_states(session, model.version) == {key: ["scored"] for key in keys}


_FAULTS_PER_BUFFER = """
import resource
import numpy as np
from worker.decode_budget import return_large_buffers_to_the_os

assert return_large_buffers_to_the_os()
buffer = np.ones(4 << 20, dtype=np.uint8)  # a model temporary: a few MB, under the mmap threshold
del buffer
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    buffer = np.ones(4 << 20, dtype=np.uint8)
    del buffer
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_freed_model_temporaries_stay_mapped_for_the_next_call() -> None:
    """The worker's allocator settings keep a freed 4 MB buffer's pages for the next one. Fixing only the
    mmap threshold (for decoded images) froze glibc's trim threshold at 128 kB: every free gave the top of
    the heap back and the next call faulted it in again, 1 024 faults per 4 MB (16 500 per image in the
    model, whose CPU doubled: 19 → 38 ms per image in a one-thread worker)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_BUFFER], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    faults = float(done.stdout.strip().splitlines()[-1])
    assert faults < 100, f"{faults:.0f} minor page faults per 4 MB buffer (1 024 pages)"

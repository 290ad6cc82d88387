"""Heatmap overlays drawn when someone looks, from the anomaly map stored in the inference row (0007).

The worker used to encode a 224² RGB overlay PNG for every scored image and upload it under
``heatmaps/`` (about 9 ms of CPU per image, more than the model needs on a GPU). It now keeps the map
itself in the row (:func:`models.heatmap.encode_map`: an 8-bit 56² PNG of about 2.5 kB), and whoever
wants to see an overlay -- ``waferwatch heatmap``, the HTML report -- draws it here, over the original
image read back at the version that was scored, with :func:`models.heatmap.render_stored`: the same
picture the worker used to store. Rows scored before 0007 only have the overlay object at
``heatmap_key``; the callers fall back to it.

Nothing here reads settings or builds a store: callers pass sessions (or connections), a store and plain
values, so the CLI and the report share one way of drawing and tests drive it with real rows.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from models.config import PatchCoreConfig
from models.errors import ModelError
from models.heatmap import HIGH, LOW, StoredMap, add_colour_scale, colorize, decode_map, render_stored, stored_map_of
from models.images import decode_image
from worker.errors import ObjectMissingError, WaferwatchError
from worker.schema import Image, Inference, ModelVersion
from worker.storage import ObjectStore

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "Rendered",
    "image_rows",
    "inference_by_version",
    "input_size_from_manifest",
    "input_sizes",
    "map_only_png",
    "read_object",
    "record_map",
    "render_map",
    "versions_that_scored",
]

#: The model input side assumed for a version whose manifest does not say (rows registered without one):
#: the default ``image_size`` of :class:`models.config.PatchCoreConfig`.
DEFAULT_INPUT_SIZE: Final = PatchCoreConfig().image_size


@dataclass(frozen=True, slots=True)
class Rendered:
    """An overlay PNG and how it was drawn: over the original image, or the coloured map alone (and why)."""

    png: bytes
    over_image: bool
    problem: str | None = None  # why the original image could not be used (None when it was)


def input_size_from_manifest(manifest: Mapping[str, Any] | None) -> int:
    """The side images were resized to before scoring (``FoldEnsemble.input_size``), from a manifest.

    Reading the manifest is enough: loading the model for its ``input_size`` would build the backbone.
    Without tiling it is the config's ``image_size``; tiled, it is the canvas the tiles were cut from,
    recomputed from the stitched patch grid (``manifest["grid"]``) exactly as :func:`models.tiling.plan_tiles`
    lays it out (the grid grows strictly with the tile's cells, so one cell count fits). A manifest that
    says nothing gives :data:`DEFAULT_INPUT_SIZE`; a tiled one without a grid ``tiles × image_size``.
    """
    manifest = manifest or {}
    config = manifest.get("config") or {}
    try:
        image_size = int(config.get("image_size") or DEFAULT_INPUT_SIZE)
        tiles = int(config.get("tiles") or 1)
        overlap = float(config.get("tile_overlap") or 0.0)
    except (TypeError, ValueError):
        return DEFAULT_INPUT_SIZE
    if tiles <= 1:
        return image_size
    grid = manifest.get("grid")
    rows = int(grid[0]) if isinstance(grid, list | tuple) and grid else None
    if rows is not None:
        for cells in range(1, image_size + 1):
            if image_size % cells:
                continue
            stride_cells = max(1, round(cells * (1.0 - overlap)))
            if cells + (tiles - 1) * stride_cells == rows:
                return image_size + (tiles - 1) * stride_cells * (image_size // cells)
    return image_size * tiles


def input_sizes(connection: Connection | Session, versions: Iterable[str]) -> dict[str, int]:
    """:func:`input_size_from_manifest` of each model version; versions without a row get the default.

    Only the manifest's ``config`` and ``grid`` are read (its list of training images can be long).
    """
    wanted = sorted(set(versions))
    sizes = dict.fromkeys(wanted, DEFAULT_INPUT_SIZE)
    if not wanted:
        return sizes
    query = select(ModelVersion.id, ModelVersion.manifest["config"], ModelVersion.manifest["grid"]).where(
        ModelVersion.id.in_(wanted)
    )
    for version, config, grid in connection.execute(query):
        sizes[version] = input_size_from_manifest({"config": config, "grid": grid})
    return sizes


def map_only_png(stored: StoredMap, *, threshold: float, size: int) -> bytes:
    """The stored map alone in the overlay's colour scale, at ``size``², with the colour bar.

    For when the original image is gone: the photo cannot be shown, but where the model saw the defect
    and how strongly can (the same scale as every overlay, so the colours mean the same).
    """
    low, high = LOW * threshold, HIGH * threshold
    heat = colorize(decode_map(stored, size=(size, size)), low=low, high=high)
    buffer = io.BytesIO()
    add_colour_scale(heat, low=low, high=high, threshold=threshold).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_map(
    stored: StoredMap,
    *,
    threshold: float,
    size: int,
    original: bytes | None,
    name: str,
    max_pixels: int = 64_000_000,
) -> Rendered:
    """The overlay of ``stored`` over the ``original`` image bytes, as the worker drew it (decoded at the
    model's input ``size`` like the worker does), or the coloured map alone when there are no bytes or they
    do not decode (``problem`` says which)."""
    if original is None:
        return Rendered(map_only_png(stored, threshold=threshold, size=size), over_image=False)
    try:
        image = decode_image(original, name=name, max_pixels=max_pixels, size=size)
    except ModelError as exc:
        problem = f"the original image does not decode ({exc})"
        return Rendered(map_only_png(stored, threshold=threshold, size=size), over_image=False, problem=problem)
    return Rendered(render_stored(image, stored, threshold=threshold, size=size), over_image=True)


def read_object(
    store: ObjectStore,
    *,
    key: str,
    max_bytes: int,
    version_id: str | None = None,
    etag: str | None = None,
    what: str = "the original image",
) -> tuple[bytes | None, str | None]:
    """The bytes of an object (for an image: the version that was scored), or None and why not.

    A versioned bucket is read at ``version_id``; otherwise ``If-Match: etag`` refuses an object that
    was overwritten since (its bytes are another image: drawing this map over them would mislead).
    ``what`` names the object in the reason.
    """
    try:
        found = store.get(key, max_bytes=max_bytes, version_id=version_id, if_match=None if version_id else etag)
    except ObjectMissingError:
        return None, f"{what} {store.bucket}/{key} is gone from storage"
    except WaferwatchError as exc:
        return None, f"{what} {store.bucket}/{key} cannot be read ({exc})"
    return found.data, None


# --- lookups -------------------------------------------------------------------------------------


def image_rows(session: Session, *, key: str) -> Sequence[Image]:
    """Every ``images`` row of an object key, newest registration first (one per object version)."""
    return session.scalars(select(Image).where(Image.key == key).order_by(Image.id.desc())).all()


def inference_by_version(session: Session, *, key: str, model_version: str) -> tuple[Image, Inference] | None:
    """The score of the newest version of ``key`` that ``model_version`` scored, with its image row."""
    query = (
        select(Image, Inference)
        .join(Inference, Inference.image_id == Image.id)
        .where(Image.key == key, Inference.model_version == model_version)
        .order_by(Image.id.desc(), Inference.id.desc())
        .limit(1)
    )
    row = session.execute(query).first()
    return None if row is None else (row[0], row[1])


def versions_that_scored(session: Session, *, key: str) -> list[str]:
    """The model versions with a score of any version of ``key``, newest score first."""
    query = (
        select(Inference.model_version)
        .join(Image, Image.id == Inference.image_id)
        .where(Image.key == key)
        .order_by(Inference.created_at.desc(), Inference.id.desc())
    )
    return list(dict.fromkeys(session.scalars(query)))


def record_map(record: Mapping[str, Any]) -> StoredMap | None:
    """The stored map of a report record (the top-anomalies query's map columns), None without one."""
    return stored_map_of(record.get("anomaly_map_png"), record.get("anomaly_map_low"), record.get("anomaly_map_high"))

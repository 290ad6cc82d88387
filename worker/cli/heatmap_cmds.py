"""``waferwatch heatmap KEY``: the overlay of one scored image, drawn now from the map in its row.

The worker no longer stores an overlay PNG per image (see :mod:`worker.overlays`); this command draws the
same picture on demand: the image read back from storage at the version that was scored, the stored map
over it, the colour scale. Rows from before maps were stored get their old overlay object copied; an
original image that is gone gives the coloured map alone, and the command says so. Exit codes as every
command: 0 a file was written, 1 nothing could be (unknown key, not scored, nothing stored), 2 usage.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import typer
from rich.markup import escape

from worker.cli.root import app, console
from worker.settings import get_settings, mask_url

#: The largest old overlay object copied (they are about 75 kB; anything far larger is not one).
MAX_OVERLAY_BYTES = 20 * 1024 * 1024


def _fail(message: str) -> typer.Exit:
    """Print ``message`` as the one error line and return the exit to raise (code 1)."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(1)


def _write(out: Path, png: bytes) -> None:
    try:
        out.write_bytes(png)
    except OSError as exc:
        raise _fail(f"cannot write --out {out}: {exc.strerror or exc}; choose a writable file") from exc


@app.command("heatmap")
def heatmap(
    key: str = typer.Argument(..., help="Image key as stored in the database, e.g. incoming/lot1/w3.png."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="PNG file to write (default: <key's file stem>.heatmap.png here).", show_default=False
    ),
    model_version: str | None = typer.Option(
        None, "--model-version", help="The model version's score to draw (default: the image's latest score)."
    ),
    url: str | None = typer.Option(None, "--url", help="Database URL (default: WAFERWATCH_DATABASE_URL / settings)."),
) -> None:
    """Write the heatmap overlay of one scored image: the anomaly map stored with its score over the image."""
    from worker import overlays, repository
    from worker.cli.database import require_migrated
    from worker.db import make_engine, make_session_factory, normalize_database_url, session_scope
    from worker.schema import ModelVersion

    target = out or Path(f"{PurePosixPath(key).stem}.heatmap.png")
    if not target.parent.is_dir():
        raise typer.BadParameter(f"{target.parent} is not a folder; create it or write elsewhere", param_hint="--out")
    settings = get_settings()
    database_url = normalize_database_url(url) if url else settings.database_url
    require_migrated(database_url)
    shown = escape(key)
    engine = make_engine(database_url, sqlite_begin="DEFERRED")
    try:
        with session_scope(make_session_factory(engine)) as session:
            images = overlays.image_rows(session, key=key)
            if not images:
                raise _fail(
                    f"no image with key {shown!r} in {mask_url(database_url)}; keys are object keys as registered "
                    "(e.g. incoming/lot1/w3.png): `waferwatch report latest-inference` lists them"
                )
            if model_version is None:
                image = images[0]
                inference = repository.latest_inference(session, image_id=image.id)
                if inference is None:
                    reason = f" ({escape(image.status_reason)})" if image.status_reason else ""
                    hint = (
                        "run this again once a worker has scored it (`waferwatch status` shows the backlog)"
                        if image.status == "queued"
                        else "it will not be scored as it is"
                    )
                    raise _fail(
                        f"{shown} is not scored: its newest version (image id {image.id}) has status "
                        f"{image.status!r}{reason}; {hint}"
                    )
            else:
                found = overlays.inference_by_version(session, key=key, model_version=model_version)
                if found is None:
                    scored_by = ", ".join(overlays.versions_that_scored(session, key=key)) or "none yet"
                    known = session.get(ModelVersion, model_version) is not None
                    problem = (
                        f"did not score {shown}"
                        if known
                        else "is no model version here (`waferwatch models list` shows them)"
                    )
                    raise _fail(
                        f"--model-version {escape(model_version)} {problem}; {shown} was scored by: "
                        f"{escape(scored_by)}; give one of those, or leave --model-version out for the latest score"
                    )
                image, inference = found
            stored = repository.stored_map(inference)
            size = overlays.input_sizes(session, [inference.model_version])[inference.model_version]
            version, threshold, heatmap_key = inference.model_version, inference.threshold, inference.heatmap_key
            where = (image.bucket, image.key, image.version_id, image.etag)
    finally:
        engine.dispose()

    bucket, image_key, version_id, etag = where
    from worker.app import make_store_from_settings

    store = make_store_from_settings(settings, bucket=bucket)
    what = f"{shown} by model version {escape(version)} (threshold {threshold:.4g})"
    if stored is None:
        if not heatmap_key:
            raise _fail(
                f"no heatmap stored for {what}: it was scored without a map (setting heatmaps=none or "
                "anomalous); re-score it with the active model (`waferwatch rescore --since ...`) to get one"
            )
        overlay, problem = overlays.read_object(
            store, key=heatmap_key, max_bytes=MAX_OVERLAY_BYTES, what="the overlay object"
        )
        if overlay is None:
            raise _fail(
                f"{what} has no stored map (scored before maps were stored), and {escape(problem or '')}; "
                "re-score it with the active model (`waferwatch rescore --since ...`) to store one"
            )
        _write(target, overlay)
        console.print(f"wrote {target}: the overlay stored at {escape(heatmap_key)} for {what}")
        return

    original, problem = overlays.read_object(
        store, key=image_key, max_bytes=settings.max_object_bytes, version_id=version_id, etag=etag
    )
    rendered = overlays.render_map(
        stored, threshold=threshold, size=size, original=original, name=image_key, max_pixels=settings.max_image_pixels
    )
    problem = problem or rendered.problem
    if not rendered.over_image and heatmap_key:
        overlay, _ = overlays.read_object(store, key=heatmap_key, max_bytes=MAX_OVERLAY_BYTES, what="the overlay")
        if overlay is not None:  # heatmap_format=overlay also wrote the picture: better than the map alone
            _write(target, overlay)
            console.print(f"[yellow]warning:[/yellow] {escape(problem or '')}; copied the overlay object instead")
            console.print(f"wrote {target}: the overlay stored at {escape(heatmap_key)} for {what}")
            return
    _write(target, rendered.png)
    if not rendered.over_image:
        console.print(
            f"[yellow]warning:[/yellow] {escape(problem or 'the original image is unavailable')}: "
            "wrote the anomaly map alone in the colour scale, without the image under it"
        )
    drawn = "overlay" if rendered.over_image else "anomaly map"
    console.print(f"wrote {target}: {drawn} of {what}, drawn at the model's {size}² px input")

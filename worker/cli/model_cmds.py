"""``waferwatch train | score | evaluate | dacon``: the model core from the command line."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models.config import DEFAULT_LAYERS, PatchCoreConfig
from models.datasets import ImageRef, list_image_source, list_images, read_image_csv
from worker.cli.root import app, console

if TYPE_CHECKING:
    from models.ensemble import FoldEnsemble

BACKBONES = tuple(DEFAULT_LAYERS)


@contextmanager
def progress_bar() -> Iterator[callable]:
    """A rich progress display; yields the ``(stage, done, total)`` callback the model core reports to."""
    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int, loss: float | None = None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            # ReConPatch's training also reports its loss (models.reconpatch.LossProgress).
            description = stage if loss is None else f"{stage} loss {loss:.4f}"
            bar.update(tasks[stage], completed=done, total=total, description=description)

        yield report


def model_config(
    backbone: str,
    layers: str | None,
    weights: str | None,
    image_size: int,
    folds: int,
    coreset_ratio: float,
    k: int,
    seed: int,
    batch_size: int,
    reconpatch: bool = False,
) -> PatchCoreConfig:
    return PatchCoreConfig(
        reconpatch=reconpatch,
        backbone=backbone,
        layers=tuple(layers.split(",")) if layers else (),
        weights_path=weights,
        image_size=image_size,
        folds=folds,
        coreset_ratio=coreset_ratio,
        k=k,
        seed=seed,
        batch_size=batch_size,
    )


_DEFAULTS = PatchCoreConfig()
BackboneOpt = typer.Option(_DEFAULTS.backbone, "--backbone", help=f"One of {', '.join(BACKBONES)}.")
LayersOpt = typer.Option(None, "--layers", help="Comma-separated layers to tap (default: the backbone's).")
WeightsOpt = typer.Option(None, "--weights", help="Weights file for torchvision backbones ('random' for timing).")
SizeOpt = typer.Option(_DEFAULTS.image_size, "--image-size", min=32)
FoldsOpt = typer.Option(_DEFAULTS.folds, "--folds", min=2)
RatioOpt = typer.Option(_DEFAULTS.coreset_ratio, "--coreset-ratio", min=0.0001, max=1.0)
KOpt = typer.Option(_DEFAULTS.k, "--k", min=1)
SeedOpt = typer.Option(_DEFAULTS.seed, "--seed")
BatchOpt = typer.Option(_DEFAULTS.batch_size, "--batch-size", min=1)
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")


def fit_and_save(refs: list[ImageRef], config: PatchCoreConfig, out: Path, device: str) -> FoldEnsemble:
    from models.ensemble import FoldEnsemble

    console.print(f"training on {len(refs)} images with {config.backbone} {list(config.layers)} → {out}")
    with progress_bar() as report:
        ensemble = FoldEnsemble.fit(
            [r.id for r in refs], [r.path for r in refs], config, device=device, progress=report
        )
    ensemble.save(out)
    for skipped in ensemble.report.skipped:
        console.print(f"[yellow]left out[/yellow] {skipped['id']}: {skipped['reason']}")
    info = ensemble.describe()
    console.print(
        f"model {info['version']}: threshold {info['threshold']:.4f} "
        f"(folds {', '.join(f'{t:.3f}' for t in info['fold_thresholds'])}), bank {info['bank_sizes']}"
    )
    return ensemble


@app.command()
def train(
    images: Path = typer.Option(..., "--images", help="Folder of nominal images, or a CSV with id,img_path."),
    out: Path = typer.Option(..., "--out", help="Model directory to write."),
    backbone: str = BackboneOpt,
    layers: str | None = LayersOpt,
    weights: str | None = WeightsOpt,
    image_size: int = SizeOpt,
    folds: int = FoldsOpt,
    coreset_ratio: float = RatioOpt,
    k: int = KOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
    reconpatch: bool = typer.Option(
        False, "--reconpatch", help="Train a ReConPatch representation of the patch features (opt-in, see README)."
    ),
) -> None:
    """Fit the fold ensemble on nominal (good) images and write a model directory."""
    config = model_config(
        backbone, layers, weights, image_size, folds, coreset_ratio, k, seed, batch_size, reconpatch=reconpatch
    )
    fit_and_save(list_image_source(images), config, out, device)


def _expand_paths(paths: list[Path]) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for path in paths:
        if path.is_dir():
            refs.extend(list_images(path))
        elif path.suffix.lower() == ".csv":
            refs.extend(read_image_csv(path))
        else:
            refs.append(ImageRef(path.stem, path))
    return refs


@app.command()
def score(
    paths: list[Path] = typer.Argument(..., help="Images, folders of images or CSVs (id,img_path)."),
    model: Path = typer.Option(..., "--model", help="Model directory from 'waferwatch train'."),
    heatmaps: Path | None = typer.Option(None, "--heatmaps", help="Write a PNG overlay per image here."),
    output_format: str = typer.Option("table", "--format", help="table, csv or json."),
    device: str = DeviceOpt,
) -> None:
    """Score images: id, score, threshold, decision and per-fold scores. Unreadable images are reported
    as errors in the output (exit code 2 if any) and never stop the others."""
    from models.ensemble import FoldEnsemble
    from models.errors import BadImageError
    from models.heatmap import overlay
    from models.images import load_image_file

    ensemble = FoldEnsemble.load(model, device=device)
    refs = _expand_paths(paths)
    rows: list[dict[str, object]] = []
    if heatmaps:
        heatmaps.mkdir(parents=True, exist_ok=True)
    batch = ensemble.config.batch_size
    with progress_bar() as report:
        for begin in range(0, len(refs), batch):
            good_refs, images = [], []
            for ref in refs[begin : begin + batch]:
                try:
                    images.append(load_image_file(ref.path, max_pixels=ensemble.config.max_image_pixels))
                    good_refs.append(ref)
                except BadImageError as exc:
                    rows.append({"id": ref.id, "path": str(ref.path), "error": exc.reason})
            for ref, image, result in zip(
                good_refs,
                images,
                ensemble.score_images(images, [r.id for r in good_refs], with_maps=bool(heatmaps)),
                strict=True,
            ):
                rows.append(
                    {
                        "id": result.id,
                        "path": str(ref.path),
                        "score": result.score,
                        "threshold": result.threshold,
                        "label": int(result.is_anomalous),
                        "fold_scores": list(result.fold_scores),
                    }
                )
                if heatmaps:
                    overlay(image, result.anomaly_map, threshold=result.threshold).save(heatmaps / f"{ref.id}.png")
            report("score", min(begin + batch, len(refs)), len(refs))
    _print_rows(rows, output_format, n_folds=len(ensemble.folds))
    if any("error" in row for row in rows):
        raise typer.Exit(2)


def _print_rows(rows: list[dict[str, object]], output_format: str, *, n_folds: int) -> None:
    if output_format == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    fold_names = [f"fold{i}" for i in range(n_folds)]
    if output_format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["id", "score", "threshold", "label", *fold_names, "error"])
        for row in rows:
            folds = row.get("fold_scores") or [""] * n_folds
            writer.writerow(
                [
                    row["id"],
                    row.get("score", ""),
                    row.get("threshold", ""),
                    row.get("label", ""),
                    *folds,
                    row.get("error", ""),
                ]
            )
        return
    if output_format != "table":
        raise typer.BadParameter(f"--format {output_format!r}: use table, csv or json")
    table = Table("id", "score", "threshold", "decision", *fold_names)
    for row in rows:
        if "error" in row:
            table.add_row(str(row["id"]), "-", "-", f"[red]error: {row['error']}[/red]", *([""] * n_folds))
            continue
        decision = "[red]DEFECT[/red]" if row["label"] else "[green]ok[/green]"
        table.add_row(
            str(row["id"]),
            f"{row['score']:.4f}",
            f"{row['threshold']:.4f}",
            decision,
            *(f"{s:.4f}" for s in row["fold_scores"]),
        )
    from rich.console import Console

    Console().print(table)


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model"),
    good: Path = typer.Option(..., "--good", help="Folder of good images."),
    bad: Path = typer.Option(..., "--bad", help="Folder of defective images."),
    masks: Path | None = typer.Option(None, "--masks", help="Folder of defect masks named like the images."),
    suffix: str | None = typer.Option(
        None, "--suffix", help="Only images with this suffix (e.g. .jpg when masks share the folder)."
    ),
    output_format: str = typer.Option("table", "--format", help="table or json."),
    device: str = DeviceOpt,
) -> None:
    """Image AUROC, F1 at the calibrated threshold, and pixel AUROC where masks are given."""
    from models.ensemble import FoldEnsemble
    from models.evaluation import evaluate_ensemble

    ensemble = FoldEnsemble.load(model, device=device)
    suffixes = (suffix,) if suffix else None
    good_refs = list_images(good, suffixes=suffixes) if suffixes else list_images(good)
    bad_refs = list_images(bad, suffixes=suffixes) if suffixes else list_images(bad)
    mask_map = None
    if masks is not None:
        mask_map = {}
        for ref in [*good_refs, *bad_refs]:
            candidates = sorted(p for p in masks.glob(f"{ref.id}.*") if p != ref.path)
            if candidates:
                mask_map[ref.id] = candidates[0]
    with progress_bar() as report:
        result, _ = evaluate_ensemble(ensemble, good_refs, bad_refs, masks=mask_map, progress=report)
    if output_format == "json":
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
        return
    table = Table("metric", "value")
    for key, value in result.as_dict().items():
        table.add_row(key, "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    from rich.console import Console

    Console().print(table)


@app.command()
def dacon(
    data: Path = typer.Option(..., "--data", help="The competition folder with train.csv and test.csv."),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="Submission CSV (id,label)."),
    scores_out: Path | None = typer.Option(None, "--scores", help="Also write id,score,threshold,label,fold…"),
    model_dir: Path | None = typer.Option(None, "--model-dir", help="Where to keep the trained model."),
    backbone: str = BackboneOpt,
    layers: str | None = LayersOpt,
    weights: str | None = WeightsOpt,
    image_size: int = SizeOpt,
    folds: int = FoldsOpt,
    coreset_ratio: float = RatioOpt,
    k: int = KOpt,
    seed: int = SeedOpt,
    batch_size: int = BatchOpt,
    device: str = DeviceOpt,
) -> None:
    """Reproduce the Dacon entry: train on train.csv, score test.csv, write the submission in test.csv's order."""
    from models.images import load_image_file

    train_csv, test_csv = data / "train.csv", data / "test.csv"
    for needed in (train_csv, test_csv):
        if not needed.is_file():
            raise typer.BadParameter(f"{needed} not found: --data must be the competition folder")
    config = model_config(backbone, layers, weights, image_size, folds, coreset_ratio, k, seed, batch_size)
    model_dir = model_dir or out.with_suffix("").with_name(out.stem + "_model")
    ensemble = fit_and_save(read_image_csv(train_csv), config, model_dir, device)
    test_refs = read_image_csv(test_csv)  # keeps test.csv's order for the submission
    results: dict[str, object] = {}
    with progress_bar() as report:
        for begin in range(0, len(test_refs), config.batch_size):
            chunk = test_refs[begin : begin + config.batch_size]
            images = [load_image_file(r.path, max_pixels=config.max_image_pixels) for r in chunk]
            for result in ensemble.score_images(images, [r.id for r in chunk], with_maps=False):
                results[result.id] = result
            report("score", min(begin + config.batch_size, len(test_refs)), len(test_refs))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["id", "label"])
        for ref in test_refs:
            writer.writerow([ref.id, int(results[ref.id].is_anomalous)])
    if scores_out:
        with scores_out.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["id", "score", "threshold", "label", *(f"fold{i}" for i in range(config.folds))])
            for ref in test_refs:
                r = results[ref.id]
                writer.writerow(
                    [ref.id, repr(r.score), repr(r.threshold), int(r.is_anomalous), *map(repr, r.fold_scores)]
                )
    n_anomalous = sum(int(r.is_anomalous) for r in results.values())
    console.print(f"wrote {out}: {n_anomalous} of {len(test_refs)} test images flagged anomalous")

"""``waferwatch train | score | evaluate | dacon``: the model core from the command line."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.config import DEFAULT_LAYERS, PRESETS, PatchCoreConfig, preset_config
from models.datasets import IMAGE_SUFFIXES, ImageRef, list_images, read_image_csv
from models.errors import ConfigError
from worker.cli.root import app, console
from worker.cli.tables import identified_table, print_table

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


#: The CLI option that sets each PatchCoreConfig field, so a config error names what the user typed.
OPTION_OF_FIELD = {
    "backbone": "--backbone",
    "layers": "--layers",
    "weights_path": "--weights",
    "image_size": "--image-size",
    "folds": "--folds",
    "coreset_ratio": "--coreset-ratio",
    "coreset_scope": "--coreset-scope",
    "k": "--k",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "threshold_rule": "--threshold-rule",
    "false_alarm_rate": "--false-alarm-rate",
    "tiles": "--tiles",
    "tile_overlap": "--tile-overlap",
    "layer_weighting": "--layer-weighting",
    "augment": "--augment",
    "reweight_neighbours": "--reweight-neighbours",
    "preset": "--preset",
}


def model_config(
    *,
    backbone: str | None = None,
    layers: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    folds: int | None = None,
    coreset_ratio: float | None = None,
    coreset_scope: str | None = None,
    k: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    preset: str | None = None,
    threshold_rule: str | None = None,
    false_alarm_rate: float | None = None,
    tiles: int | None = None,
    tile_overlap: float | None = None,
    layer_weighting: str | None = None,
    augment: str | None = None,
    reweight_neighbours: int | None = None,
    reconpatch: bool | None = None,
) -> PatchCoreConfig:
    """The one place where model options become a :class:`PatchCoreConfig`.

    Only the options the user gave are passed (None = not given), so every default comes from
    ``models/config.py`` and the demo, ``train`` and ``dacon`` cannot drift apart. An invalid value is a
    usage error that names its option, raised before any work starts.
    """
    given = {
        "backbone": backbone,
        "layers": tuple(name.strip() for name in layers.split(",") if name.strip()) if layers else None,
        "weights_path": weights,
        "image_size": image_size,
        "folds": folds,
        "coreset_ratio": coreset_ratio,
        "coreset_scope": coreset_scope,
        "k": k,
        "seed": seed,
        "batch_size": batch_size,
        "threshold_rule": threshold_rule,
        "false_alarm_rate": false_alarm_rate,
        "tiles": tiles,
        "tile_overlap": tile_overlap,
        "layer_weighting": layer_weighting,
        "augment": augment,
        "reweight_neighbours": reweight_neighbours,
        "reconpatch": reconpatch or None,
    }
    try:
        overrides = {name: value for name, value in given.items() if value is not None}
        config = preset_config(preset or "default", **overrides)
    except ConfigError as exc:
        field = str(exc).split("=", 1)[0].strip()
        raise typer.BadParameter(str(exc), param_hint=OPTION_OF_FIELD.get(field, "model options")) from exc
    if weights and weights != "random" and not Path(weights).is_file():
        raise typer.BadParameter(f"{weights} is not a file; give a weights file or 'random'", param_hint="--weights")
    return config


_DEFAULTS = PatchCoreConfig()
BackboneOpt = typer.Option(
    None, "--backbone", help=f"One of {', '.join(BACKBONES)} (default: {_DEFAULTS.backbone}).", show_default=False
)
LayersOpt = typer.Option(None, "--layers", help="Comma-separated layers to tap (default: the backbone's).")
WeightsOpt = typer.Option(None, "--weights", help="Weights file for torchvision backbones ('random' for timing).")
SizeOpt = typer.Option(None, "--image-size", help=f"Input size in pixels (default: {_DEFAULTS.image_size}).")
FoldsOpt = typer.Option(None, "--folds", help=f"Folds of the ensemble, at least 2 (default: {_DEFAULTS.folds}).")
RatioOpt = typer.Option(
    None, "--coreset-ratio", help=f"Fraction of patches kept in each bank, (0, 1] (default: {_DEFAULTS.coreset_ratio})."
)
ScopeOpt = typer.Option(
    None,
    "--coreset-scope",
    help="part: one coreset per fold part, each fold's bank the union of the other parts' (16x less work); "
    f"fold: one coreset per fold, as in the original recipe (default: {_DEFAULTS.coreset_scope}).",
    show_default=False,
)
KOpt = typer.Option(None, "--k", help=f"Nearest neighbours per patch score (default: {_DEFAULTS.k}).")
SeedOpt = typer.Option(None, "--seed", help=f"Seed of the fold split and coresets (default: {_DEFAULTS.seed}).")
BatchOpt = typer.Option(None, "--batch-size", help=f"Images per backbone batch (default: {_DEFAULTS.batch_size}).")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
SuffixOpt = typer.Option(
    None, "--suffix", help="Only files with this suffix in folders (e.g. .jpg when .png masks share the folder)."
)
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing model directory (default: refuse).")
PresetOpt = typer.Option(
    None, "--preset", help=f"A named recipe ({', '.join(PRESETS)}); 'original' is the Dacon team's (needs --weights)."
)
RuleOpt = typer.Option(
    None,
    "--threshold-rule",
    help=f"fold_max (mean of fold maxima), percentile or gpd (tail fit) (default: {_DEFAULTS.threshold_rule}).",
)
FalseAlarmOpt = typer.Option(
    None,
    "--false-alarm-rate",
    help=f"Target share of good images flagged, for percentile/gpd (default: {_DEFAULTS.false_alarm_rate}).",
)
TilesOpt = typer.Option(None, "--tiles", help="Tiles per side for large images with small defects (default: 1).")
OverlapOpt = typer.Option(None, "--tile-overlap", help="Share of a tile its neighbours overlap, [0, 0.5] (default: 0).")
WeightingOpt = typer.Option(None, "--layer-weighting", help="none, channels or l2 (default: none).")
AugmentOpt = typer.Option(
    None,
    "--augment",
    help="Add mirrored (flips) or mirrored and turned (dihedral) copies of the good images to the banks; only "
    "for products that look the same that way (default: none).",
)
ReweightOpt = typer.Option(
    None, "--reweight-neighbours", help=f"Eq. 7 neighbourhood b, >= 2 (default: {_DEFAULTS.reweight_neighbours})."
)


def check_device(device: str) -> str:
    """``--device`` checked up front (the same forms as the ``device`` setting)."""
    value = device.strip().lower()
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise typer.BadParameter(f"{device!r}: use auto, cpu, cuda or cuda:N", param_hint="--device")
    return value


def check_model_out(out: Path, *, overwrite: bool, option: str = "--out") -> None:
    """Refuse, before training, to write over a directory that holds files unless ``--overwrite``."""
    from models.artifacts import MANIFEST  # imports torch: only for the commands that write models

    if out.is_file():
        raise typer.BadParameter(f"{out} is a file; a model is a directory", param_hint=option)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a model" if (out / MANIFEST).is_file() else "files"
        raise typer.BadParameter(
            f"{out} already holds {what}; pass --overwrite to replace it, or choose another directory",
            param_hint=option,
        )


def _suffixes(suffix: str | None) -> tuple[str, ...] | None:
    if suffix is None:
        return None
    value = suffix.strip().lower()
    if not value:
        raise typer.BadParameter("give a suffix such as .jpg", param_hint="--suffix")
    return (value if value.startswith(".") else f".{value}",)


def list_folder(folder: Path, suffix: str | None, *, option: str) -> list[ImageRef]:
    """The images of ``folder`` (only ``suffix`` files when given); a listing error names the option and,
    for ids that appear twice (``x.jpg`` beside its mask ``x.png``), says to pass ``--suffix``."""
    if not folder.is_dir():
        raise typer.BadParameter(f"{folder} is not a folder", param_hint=option)
    suffixes = _suffixes(suffix)
    try:
        return list_images(folder, suffixes=suffixes) if suffixes else list_images(folder)
    except ValueError as exc:
        counts: dict[str, int] = {}
        for path in folder.iterdir():
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                counts[path.suffix.lower()] = counts.get(path.suffix.lower(), 0) + 1
        found = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        choices = " or ".join(f"--suffix {name}" for name in sorted(counts)) or "--suffix .jpg"
        raise typer.BadParameter(
            f"{exc} (the folder holds {found} files, e.g. images and their masks); pass {choices} "
            "to use only the images",
            param_hint=option,
        ) from exc


def list_source(source: Path, suffix: str | None, *, option: str) -> list[ImageRef]:
    """A folder (see :func:`list_folder`) or a CSV of ``id,img_path``, sorted by id; never empty."""
    if source.suffix.lower() == ".csv" and source.is_file():
        try:
            refs = sorted(read_image_csv(source), key=lambda ref: ref.id)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=option) from exc
    elif source.is_dir():
        refs = sorted(list_folder(source, suffix, option=option), key=lambda ref: ref.id)
    else:
        raise typer.BadParameter(f"{source} is neither a folder of images nor a CSV file", param_hint=option)
    if not refs:
        what = f"{suffix} files" if suffix else f"images ({', '.join(IMAGE_SUFFIXES)})"
        raise typer.BadParameter(f"{source} holds no {what}", param_hint=option)
    return refs


def fit_and_save(
    refs: list[ImageRef], config: PatchCoreConfig, out: Path, device: str, *, overwrite: bool = False
) -> FoldEnsemble:
    from models.ensemble import FoldEnsemble

    console.print(f"training on {len(refs)} images with {config.backbone} {list(config.layers)} → {out}")
    with progress_bar() as report:
        ensemble = FoldEnsemble.fit(
            [r.id for r in refs], [r.path for r in refs], config, device=device, progress=report
        )
    ensemble.save(out, overwrite=overwrite)
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
    out: Path = typer.Option(..., "--out", help="Model directory to write (refused if it exists, see --overwrite)."),
    suffix: str | None = SuffixOpt,
    overwrite: bool = OverwriteOpt,
    backbone: str | None = BackboneOpt,
    layers: str | None = LayersOpt,
    weights: str | None = WeightsOpt,
    image_size: int | None = SizeOpt,
    folds: int | None = FoldsOpt,
    coreset_ratio: float | None = RatioOpt,
    coreset_scope: str | None = ScopeOpt,
    k: int | None = KOpt,
    seed: int | None = SeedOpt,
    batch_size: int | None = BatchOpt,
    preset: str | None = PresetOpt,
    threshold_rule: str | None = RuleOpt,
    false_alarm_rate: float | None = FalseAlarmOpt,
    tiles: int | None = TilesOpt,
    tile_overlap: float | None = OverlapOpt,
    layer_weighting: str | None = WeightingOpt,
    augment: str | None = AugmentOpt,
    reweight_neighbours: int | None = ReweightOpt,
    device: str = DeviceOpt,
    reconpatch: bool = typer.Option(
        False, "--reconpatch", help="Train a ReConPatch representation of the patch features (opt-in, see README)."
    ),
) -> None:
    """Fit the fold ensemble on nominal (good) images and write a model directory."""
    config = model_config(
        backbone=backbone,
        layers=layers,
        weights=weights,
        image_size=image_size,
        folds=folds,
        coreset_ratio=coreset_ratio,
        coreset_scope=coreset_scope,
        k=k,
        seed=seed,
        batch_size=batch_size,
        preset=preset,
        threshold_rule=threshold_rule,
        false_alarm_rate=false_alarm_rate,
        tiles=tiles,
        tile_overlap=tile_overlap,
        layer_weighting=layer_weighting,
        augment=augment,
        reweight_neighbours=reweight_neighbours,
        reconpatch=reconpatch,
    )
    device = check_device(device)
    check_model_out(out, overwrite=overwrite)
    refs = list_source(images, suffix, option="--images")
    if len(refs) < config.folds:
        raise typer.BadParameter(
            f"{images} holds {len(refs)} images, fewer than --folds {config.folds}", param_hint="--images"
        )
    fit_and_save(refs, config, out, device, overwrite=overwrite)


def _expand_paths(paths: list[Path], suffix: str | None) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for path in paths:
        if path.is_dir():
            refs.extend(list_folder(path, suffix, option="PATHS"))
        elif path.suffix.lower() == ".csv" and path.is_file():
            refs.extend(list_source(path, None, option="PATHS"))
        else:
            refs.append(ImageRef(path.stem, path))  # a missing file becomes an error row, like a broken one
    return refs


class OutputFormat(StrEnum):
    """How ``score`` prints its rows."""

    TABLE = "table"
    CSV = "csv"
    JSON = "json"


def heatmap_file_name(image_id: str) -> str:
    """``TEST_093`` → ``TEST_093.heatmap.png``: says what it is and never doubles the image's suffix."""
    return f"{image_id}.heatmap.png"


@app.command()
def score(
    paths: list[Path] = typer.Argument(..., help="Images, folders of images or CSVs (id,img_path)."),
    model: Path = typer.Option(..., "--model", help="Model directory from 'waferwatch train'."),
    heatmaps: Path | None = typer.Option(
        None, "--heatmaps", help="Write an overlay per image here (<id>.heatmap.png, with a colour scale)."
    ),
    output_format: OutputFormat = typer.Option(OutputFormat.TABLE, "--format", help="table, csv or json."),
    suffix: str | None = SuffixOpt,
    device: str = DeviceOpt,
) -> None:
    """Score images: id, score, threshold, decision and per-fold scores. Unreadable or missing images are
    reported as errors in the output and never stop the others; the exit code is then 2."""
    from models.ensemble import FoldEnsemble
    from models.errors import BadImageError
    from models.heatmap import heatmap_png
    from models.images import load_image_file

    device = check_device(device)
    refs = _expand_paths(paths, suffix)
    if not refs:
        raise typer.BadParameter("no images found in the given folders", param_hint="PATHS")
    if heatmaps is not None and heatmaps.exists() and not heatmaps.is_dir():
        raise typer.BadParameter(f"{heatmaps} is a file; give a folder", param_hint="--heatmaps")
    ensemble = FoldEnsemble.load(model, device=device)
    rows: list[dict[str, object]] = []
    if heatmaps:
        heatmaps.mkdir(parents=True, exist_ok=True)
    batch = ensemble.config.batch_size
    with progress_bar() as report:
        for begin in range(0, len(refs), batch):
            good_refs, images = [], []
            for ref in refs[begin : begin + batch]:
                try:
                    images.append(
                        load_image_file(ref.path, max_pixels=ensemble.config.max_image_pixels, size=ensemble.input_size)
                    )
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
                    png = heatmap_png(image, result.anomaly_map, threshold=result.threshold)
                    (heatmaps / heatmap_file_name(ref.id)).write_bytes(png)
            report("score", min(begin + batch, len(refs)), len(refs))
    _print_rows(rows, output_format, n_folds=len(ensemble.folds))
    if heatmaps:
        console.print(f"heatmaps: {heatmaps}/<id>.heatmap.png")
    failed = sum(1 for row in rows if "error" in row)
    if failed:
        console.print(f"[yellow]{failed} of {len(rows)} images could not be scored[/yellow] (exit code 2)")
        raise typer.Exit(2)


def _print_rows(rows: list[dict[str, object]], output_format: OutputFormat, *, n_folds: int) -> None:
    if output_format is OutputFormat.JSON:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    fold_names = [f"fold{i}" for i in range(n_folds)]
    if output_format is OutputFormat.CSV:
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
    table = identified_table("id", "score", "threshold", "decision", "fold scores")
    for row in rows:
        if "error" in row:
            table.add_row(str(row["id"]), "-", "-", f"[red]error: {row['error']}[/red]", "")
            continue
        decision = "[red]DEFECT[/red]" if row["label"] else "[green]ok[/green]"
        table.add_row(
            str(row["id"]),
            f"{row['score']:.4f}",
            f"{row['threshold']:.4f}",
            decision,
            " ".join(f"{s:.4f}" for s in row["fold_scores"]),
        )
    print_table(table)


class MetricsFormat(StrEnum):
    """How ``evaluate`` prints."""

    TABLE = "table"
    JSON = "json"


def find_masks(masks: Path, good: list[ImageRef], bad: list[ImageRef]) -> dict[str, Path]:
    """The mask of each image, by id (``<masks>/<id>.*``); every defective image must have one, checked
    before scoring so a wrong ``--masks`` folder fails at once and names the first image without a mask."""
    if not masks.is_dir():
        raise typer.BadParameter(f"{masks} is not a folder", param_hint="--masks")
    found: dict[str, Path] = {}
    for ref in [*good, *bad]:
        candidates = sorted(p for p in masks.glob(f"{ref.id}.*") if p != ref.path and p.is_file())
        if candidates:
            found[ref.id] = candidates[0]
    missing = [ref for ref in bad if ref.id not in found]
    if missing:
        raise typer.BadParameter(
            f"{masks} has no mask for the defective image {missing[0].path} (expected {masks}/{missing[0].id}.*; "
            f"{len(missing)} of {len(bad)} defective images lack one); give the folder of masks named like the images",
            param_hint="--masks",
        )
    return found


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", help="Model directory from 'waferwatch train'."),
    good: Path = typer.Option(..., "--good", help="Folder of good images."),
    bad: Path = typer.Option(..., "--bad", help="Folder of defective images."),
    masks: Path | None = typer.Option(None, "--masks", help="Folder of defect masks named like the images."),
    suffix: str | None = SuffixOpt,
    output_format: MetricsFormat = typer.Option(MetricsFormat.TABLE, "--format", help="table or json."),
    device: str = DeviceOpt,
) -> None:
    """Image AUROC, F1 at the calibrated threshold, and pixel AUROC where masks are given."""
    from models.ensemble import FoldEnsemble
    from models.evaluation import evaluate_ensemble

    device = check_device(device)
    good_refs = list_source(good, suffix, option="--good")
    bad_refs = list_source(bad, suffix, option="--bad")
    mask_map = find_masks(masks, good_refs, bad_refs) if masks is not None else None
    ensemble = FoldEnsemble.load(model, device=device)
    with progress_bar() as report:
        result, _ = evaluate_ensemble(ensemble, good_refs, bad_refs, masks=mask_map, progress=report)
    rule = ensemble.config.threshold_rule
    metrics = {
        **result.as_dict(),
        "threshold": ensemble.threshold,
        "threshold_rule": rule,
        "target_false_alarm_rate": None if rule in ("fold_max", "labelled") else ensemble.config.false_alarm_rate,
    }
    if output_format is MetricsFormat.JSON:
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
        return
    table = identified_table("metric", "value")
    for key, value in metrics.items():
        table.add_row(key, "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    print_table(table)


@app.command()
def dacon(
    data: Path = typer.Option(..., "--data", help="The competition folder with train.csv and test.csv."),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="Submission CSV (id,label)."),
    scores_out: Path | None = typer.Option(None, "--scores", help="Also write id,score,threshold,label,fold…"),
    model_dir: Path | None = typer.Option(
        None, "--model-dir", help="Where to keep the trained model (default: <out>_model next to --out)."
    ),
    overwrite: bool = OverwriteOpt,
    backbone: str | None = BackboneOpt,
    layers: str | None = LayersOpt,
    weights: str | None = WeightsOpt,
    image_size: int | None = SizeOpt,
    folds: int | None = FoldsOpt,
    coreset_ratio: float | None = RatioOpt,
    coreset_scope: str | None = ScopeOpt,
    k: int | None = KOpt,
    seed: int | None = SeedOpt,
    batch_size: int | None = BatchOpt,
    preset: str | None = PresetOpt,
    threshold_rule: str | None = RuleOpt,
    false_alarm_rate: float | None = FalseAlarmOpt,
    tiles: int | None = TilesOpt,
    tile_overlap: float | None = OverlapOpt,
    layer_weighting: str | None = WeightingOpt,
    augment: str | None = AugmentOpt,
    reweight_neighbours: int | None = ReweightOpt,
    device: str = DeviceOpt,
) -> None:
    """Train on train.csv, score test.csv, write the submission in test.csv's order, with the product defaults
    (``--preset original`` for the Dacon team's own recipe)."""
    from models.images import load_image_file

    train_csv, test_csv = data / "train.csv", data / "test.csv"
    for needed in (train_csv, test_csv):
        if not needed.is_file():
            raise typer.BadParameter(f"{needed} not found: --data must be the competition folder", param_hint="--data")
    config = model_config(
        backbone=backbone,
        layers=layers,
        weights=weights,
        image_size=image_size,
        folds=folds,
        coreset_ratio=coreset_ratio,
        coreset_scope=coreset_scope,
        k=k,
        seed=seed,
        batch_size=batch_size,
        preset=preset,
        threshold_rule=threshold_rule,
        false_alarm_rate=false_alarm_rate,
        tiles=tiles,
        tile_overlap=tile_overlap,
        layer_weighting=layer_weighting,
        augment=augment,
        reweight_neighbours=reweight_neighbours,
    )
    device = check_device(device)
    model_dir = model_dir or out.with_suffix("").with_name(out.stem + "_model")
    check_model_out(model_dir, overwrite=overwrite, option="--model-dir")
    for target, option in ((out, "--out"), (scores_out, "--scores")):
        if target is not None and target.is_dir():
            raise typer.BadParameter(f"{target} is a folder; give a CSV file name", param_hint=option)
    train_refs = list_source(train_csv, None, option="--data")
    list_source(test_csv, None, option="--data")  # refuses an empty or malformed test.csv
    test_refs = read_image_csv(test_csv)  # keeps test.csv's order for the submission
    missing = [ref for ref in [*train_refs, *test_refs] if not ref.path.is_file()]
    if missing:
        raise typer.BadParameter(
            f"{missing[0].path} (image {missing[0].id!r}) does not exist; {len(missing)} images listed in "
            f"{data}/*.csv are missing",
            param_hint="--data",
        )
    ensemble = fit_and_save(train_refs, config, model_dir, device, overwrite=overwrite)
    results: dict[str, object] = {}
    with progress_bar() as report:
        for begin in range(0, len(test_refs), config.batch_size):
            chunk = test_refs[begin : begin + config.batch_size]
            images = [
                load_image_file(r.path, max_pixels=config.max_image_pixels, size=ensemble.input_size) for r in chunk
            ]
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
        scores_out.parent.mkdir(parents=True, exist_ok=True)
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

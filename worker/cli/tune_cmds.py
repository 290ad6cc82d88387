"""``waferwatch tune``: choose a config on the user's own images, then write the best model."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models.config import PatchCoreConfig
from models.datasets import IMAGE_SUFFIXES, list_image_source, list_images
from worker.cli.root import app, console


@app.command()
def tune(
    images: Path = typer.Option(..., "--images", help="Folder (or id,img_path CSV) of nominal (good) images."),
    out: Path = typer.Option(..., "--out", help="Model directory to write with the best config."),
    bad: Path | None = typer.Option(None, "--bad", help="Folder of defective images: rank by real defects."),
    budget_minutes: float = typer.Option(30.0, "--budget-minutes", min=0.1, help="Stop trying candidates after."),
    max_trials: int | None = typer.Option(None, "--max-trials", min=1, help="Try at most this many candidates."),
    suffix: str | None = typer.Option(None, "--suffix", help="Only files with this suffix, e.g. .jpg."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic defects."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model directory at --out."),
) -> None:
    """Try candidate configs on held-out nominal images against synthetic defects (and real ones with --bad),
    print them ranked, and train the best on all the images."""
    from models.ensemble import FoldEnsemble
    from models.images import load_image_file
    from models.tuning import run_trials, search_space

    if (out / "manifest.json").exists() and not overwrite:
        raise typer.BadParameter(f"{out} already holds a model; pass --overwrite to replace it", param_hint="--out")
    suffixes = (suffix.lower(),) if suffix else IMAGE_SUFFIXES
    refs = list_images(images, suffixes=suffixes) if images.is_dir() else list_image_source(images)
    if len(refs) < 20:
        raise typer.BadParameter(f"{images} has {len(refs)} images; tuning needs at least 20", param_hint="--images")
    bad_images = [load_image_file(r.path) for r in list_images(bad, suffixes=suffixes)] if bad else []
    largest = max(max(load_image_file(r.path).size) for r in refs[:: max(1, len(refs) // 8)])
    candidates = search_space(PatchCoreConfig(seed=0), largest)
    console.print(
        f"tuning on {len(refs)} nominal images{f' and {len(bad_images)} defective' if bad else ''}: "
        f"{len(candidates)} candidates, budget {budget_minutes:g} min"
    )
    with Progress(
        TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("candidates", total=len(candidates))

        def report(name: str, done: int, planned: int) -> None:
            bar.update(task, description=name, completed=done, total=planned)

        trials = run_trials(
            [r.id for r in refs],
            [r.path for r in refs],
            candidates,
            bad=bad_images,
            budget_s=budget_minutes * 60,
            max_trials=max_trials,
            seed=seed,
            device=device,
            progress=report,
        )
    _print_trials(trials, ranked_by="real defects" if bad else "synthetic defects")
    best = trials[0]
    if best.error is not None:
        raise typer.BadParameter(f"no candidate could be fitted: {best.error}")
    console.print(f"best: {best.name}; training it on all {len(refs)} images → {out}")
    ensemble = FoldEnsemble.fit([r.id for r in refs], [r.path for r in refs], best.config, device=device)
    ensemble.save(out, overwrite=overwrite)
    console.print(f"model {ensemble.version}: threshold {ensemble.threshold:.4f} ({best.config.threshold_rule})")


def _print_trials(trials: list, *, ranked_by: str) -> None:
    table = Table(title=f"candidates, ranked by {ranked_by}")
    for column in ("rank", "candidate", "synthetic AUROC", "synthetic pixel AUROC", "real AUROC", "seconds"):
        table.add_column(column, no_wrap=column == "candidate", overflow="fold")

    def cell(value: float | None) -> str:
        return "–" if value is None or math.isnan(value) else f"{value:.3f}"

    for rank, trial in enumerate(trials, start=1):
        table.add_row(
            str(rank),
            trial.name if trial.error is None else f"{trial.name} (failed: {trial.error})",
            cell(trial.synthetic_auroc),
            cell(trial.synthetic_pixel_auroc),
            cell(trial.real_auroc),
            f"{trial.seconds:.1f}",
        )
    console.print(table)

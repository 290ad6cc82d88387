"""Choosing a config for the user's own images: a fixed search space, ranked without (or with) labels.

``waferwatch tune`` hands this module the user's nominal images and, when they have some, defective ones.
Every candidate is fitted on the same deterministic training part of the nominal images
(:func:`models.validation.split_heldout`) and scored on the held-out nominal images against synthetic
defects made from them (:mod:`models.synthetic`) and, when given, against the real defects. Candidates are
ranked by the real-defect image AUROC when there are real defects, else by the synthetic one; ties go to the
cheaper candidate (the earlier one in :data:`SEARCH_SPACE`, which is ordered by cost).

The candidates and their order are fixed, the splits hash-based and every fit seeded, so the same images
give the same ranking of the candidates tried. A time budget decides how many are tried (the first,
the product default, always is); ``max_trials`` makes that count exact too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from models.config import PatchCoreConfig
from models.ensemble import FoldEnsemble
from models.errors import BackboneWeightsMissingError, ConfigError
from models.validation import NominalImage, _as_image, _as_source, _auroc, score_synthetic, split_heldout

#: (name, overrides of the base config), cheapest and most often best first. Tiling is tried when the
#: images are larger than the model input (see :func:`search_space`).
SEARCH_SPACE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default", {}),
    ("coreset 1%", {"coreset_ratio": 0.01}),
    ("coreset 25%", {"coreset_ratio": 0.25}),
    ("k 3", {"k": 3}),
    ("no eq. 7", {"reweight": False}),
    ("layers balanced", {"layer_weighting": "channels"}),
    ("320 px", {"image_size": 320}),
    ("finest grid", {"align": "finest"}),
    ("deeper layers", {"layers": ("blocks.4", "blocks.10", "blocks.14")}),
    ("efficientnet_lite1", {"backbone": "efficientnet_lite1"}),
    ("efficientnet_lite2", {"backbone": "efficientnet_lite2"}),
)
TILED_SPACE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("tiles 2x2", {"tiles": 2}),
    ("tiles 3x3", {"tiles": 3}),
    ("tiles 4x4", {"tiles": 4}),
)

#: Progress callback: (candidate name, trials done, trials planned).
TuneProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Trial:
    """One candidate's result. ``real_auroc`` is None without real defects; ``error`` is set when the
    candidate could not be fitted (a backbone whose weights are missing, say) and it ranks last."""

    name: str
    config: PatchCoreConfig
    synthetic_auroc: float
    synthetic_pixel_auroc: float | None
    real_auroc: float | None
    seconds: float
    error: str | None = None

    @property
    def rank_key(self) -> float:
        if self.error is not None:
            return -1.0
        return self.real_auroc if self.real_auroc is not None else self.synthetic_auroc


def search_space(base: PatchCoreConfig, largest_side: int) -> list[tuple[str, PatchCoreConfig]]:
    """The candidates for images whose largest side is ``largest_side`` px, as configs over ``base``.

    Tiles are tried only where each tile would still see at least the model's input size of the original
    pixels, i.e. up to ``largest_side // image_size`` tiles per side; duplicates of an earlier candidate are
    dropped.
    """
    space = list(SEARCH_SPACE)
    max_tiles = max(1, largest_side // base.image_size)
    space += [(name, overrides) for name, overrides in TILED_SPACE if overrides["tiles"] <= max_tiles]
    seen: set[str] = set()
    candidates = []
    for name, overrides in space:
        try:
            config = base.replace(**overrides)
        except ConfigError:
            continue
        key = repr(sorted(config.to_dict().items()))
        if key not in seen:
            seen.add(key)
            candidates.append((name, config))
    return candidates


def run_trials(
    ids: Sequence[str],
    images: Sequence[NominalImage],
    candidates: Sequence[tuple[str, PatchCoreConfig]],
    *,
    bad: Sequence[Image.Image] = (),
    budget_s: float | None = None,
    max_trials: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: TuneProgress | None = None,
) -> list[Trial]:
    """Fit and score each candidate in order until the budget or ``max_trials`` is spent; ranked best first."""
    if len(ids) != len(images):
        raise ConfigError(f"got {len(ids)} ids but {len(images)} images")
    by_id = dict(zip(ids, images, strict=True))
    train_ids, heldout_ids = split_heldout(ids)
    if len(heldout_ids) < 2 or len(train_ids) < max(c.folds for _, c in candidates):
        raise ConfigError(f"{len(ids)} nominal images are too few to tune on: give at least 20 (--images)")
    planned = min(len(candidates), max_trials or len(candidates))
    started = time.perf_counter()
    trials: list[Trial] = []
    for name, config in candidates[:planned]:
        if trials and budget_s is not None:
            spent = time.perf_counter() - started
            if spent + spent / len(trials) > budget_s:
                break
        if progress:
            progress(name, len(trials), planned)
        trials.append(_trial(name, config, train_ids, heldout_ids, by_id, bad, seed, device))
    if progress:
        progress("done", len(trials), planned)
    return sorted(trials, key=lambda t: -t.rank_key)  # stable: ties keep the cheaper, earlier candidate


def _trial(
    name: str,
    config: PatchCoreConfig,
    train_ids: list[str],
    heldout_ids: list[str],
    by_id: dict[str, NominalImage],
    bad: Sequence[Image.Image],
    seed: int,
    device: str,
) -> Trial:
    began = time.perf_counter()
    try:
        ensemble = FoldEnsemble.fit(train_ids, [_as_source(by_id[i]) for i in train_ids], config, device=device)
    except (BackboneWeightsMissingError, ConfigError) as exc:
        return Trial(name, config, float("nan"), None, None, time.perf_counter() - began, error=str(exc))
    synthetic = score_synthetic(ensemble, heldout_ids, [by_id[i] for i in heldout_ids], seed=seed)
    real = None
    if bad:
        heldout = [_as_image(by_id[i], i, config) for i in heldout_ids]
        good_scores = [r.score for r in ensemble.score_images(heldout, heldout_ids, with_maps=False)]
        bad_scores = [r.score for r in ensemble.score_images(list(bad), with_maps=False)]
        real = _auroc(np.asarray(good_scores), np.asarray(bad_scores))
    return Trial(
        name,
        config,
        synthetic.image_auroc,
        synthetic.pixel_auroc,
        real,
        time.perf_counter() - began,
    )

"""The one configuration object of the model core.

Frozen so a fitted ensemble can carry the exact config it was built with into its manifest, and compared
field by field when a model directory is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from models.errors import ConfigError

ThresholdAggregate = Literal["mean", "max", "median"]
LayerWeighting = Literal["none", "channels", "l2"]
ScoreAggregate = Literal["max", "mean"]
ThresholdRule = Literal["fold_max", "percentile", "gpd", "labelled"]
Augment = Literal["none", "flips", "dihedral"]
CoresetScope = Literal["fold", "part"]

#: Layers tapped by default for each backbone (mid-level features, as in PatchCore).
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": ("blocks.4", "blocks.10"),
    # Lite1/Lite2: the same stage ends as Lite0's blocks.4 + blocks.10 (end of the stride-8 stage, end of
    # the last stride-16 stage): 40+112 channels on Lite1, 48+120 on Lite2.
    "efficientnet_lite1": ("blocks.6", "blocks.14"),
    "efficientnet_lite2": ("blocks.6", "blocks.14"),
    "wide_resnet101_2": ("layer2", "layer3"),
    "wide_resnet50_2": ("layer2", "layer3"),
    "resnet50": ("layer2", "layer3"),
    "efficientnet_b1": ("features.3", "features.5"),
    "densenet121": ("features.denseblock2", "features.denseblock3"),
}

#: Channel count patch features are pooled to (PatchCore's target_embed_dimension); 0 keeps the concatenated
#: channels. The ResNet family concatenates 1536 (resnet50: 512+1024) or more channels, which 1024 halves at
#: no measurable loss in the paper; Lite0's blocks.4+blocks.10 give only 152 channels, kept as they are
#: (see bench/bench_quality.py --target-dims for the measurement).
DEFAULT_TARGET_DIM: dict[str, int] = {
    "efficientnet_lite0": 0,
    "efficientnet_lite1": 0,
    "efficientnet_lite2": 0,
    "wide_resnet101_2": 1024,
    "wide_resnet50_2": 1024,
    "resnet50": 1024,
    "efficientnet_b1": 0,
    "densenet121": 1024,
}


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that determines a fitted fold ensemble and its scores.

    The structure is the Dacon-winning recipe (3×3 neighbourhood, eq. 7 re-weighting, a 5-fold ensemble of
    banks); the defaults are the ones ``bench/bench_quality.py`` found best on both labelled sets together
    (k = 1, a generalised-Pareto threshold, the mean of the fold scores), on the offline EfficientNet-Lite0
    backbone. ``PRESETS["original"]`` is the team's recipe as they ran it.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ()  # empty → DEFAULT_LAYERS[backbone]
    weights_path: str | None = None  # torchvision backbones: explicit weights file
    image_size: int = 224
    patch_size: int = 3  # local neighbourhood averaged around each feature-map position
    align: Literal["finest", "coarsest"] = "coarsest"  # grid the tapped layers are aligned to (see README)
    target_dim: int | None = None  # None → DEFAULT_TARGET_DIM[backbone]; 0 → keep the concatenated channels
    coreset_ratio: float = 0.01
    coreset_projection_dim: int = 128  # random projection for features wider than 2× this; 0 = never
    # "fold": one greedy coreset over each fold's train images (the original recipe); "part": one over each of
    # the folds' disjoint validation parts, a fold's bank being the union of the other parts' coresets, so
    # every patch is in one coreset search instead of four (models.training.part_coresets).
    coreset_scope: CoresetScope = "fold"
    k: int = 1  # nearest bank entries averaged into a patch score (bench_quality: 1 beats 3 and 5 on both sets)
    reweight: bool = True  # PatchCore eq. 7
    reweight_neighbours: int = 9  # eq. 7's b: bank neighbourhood of m* the weight is a softmax over (anomalib: 9)
    folds: int = 5
    seed: int = 0
    threshold_aggregate: ThresholdAggregate = "mean"  # how fold_max combines the fold maxima
    threshold_rule: ThresholdRule = "gpd"  # models.ensemble.ensemble_threshold (see README: decisions)
    # target share of nominal images flagged (percentile and gpd rules). 15%: with the mean aggregate the held-out
    # good images of both labelled sets were flagged at 9.9% / 13.3% (a test image's score averages 5 folds,
    # an out-of-fold score comes from one), about what the old max aggregate flagged at 5%, with F1 higher
    false_alarm_rate: float = 0.15
    # rule "labelled": the threshold refitted on reviewed images (models.calibration, waferwatch models
    # calibrate); None otherwise, and then left out of to_dict so the versions of other models do not change
    labelled_threshold: float | None = None
    # how the folds' scores (and maps) become the image's: "mean" won on both labelled sets (bench_quality),
    # "max" is the original recipe and flags about twice the false_alarm_rate asked for
    score_aggregate: ScoreAggregate = "mean"
    smoothing_sigma: float = 4.0
    max_image_pixels: int = 64_000_000
    batch_size: int = 32
    tiles: int = 1  # tiles per side: the image is resized to a canvas of about tiles x image_size and cut
    tile_overlap: float = 0.0  # fraction of a tile that neighbouring tiles share (rounded to patch cells)
    layer_weighting: LayerWeighting = "none"  # how tapped layers are balanced (models.embedding.weigh_layer)
    augment: Augment = "none"  # extra bank copies of the training images (models.augment); only for symmetric products
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # --- ReConPatch (models/reconpatch.py): a trained linear modulation of the patch features (opt-in) ---
    reconpatch: bool = False
    reconpatch_dim: int = 64  # output width of the representation layer f (the banks' embed_dim)
    reconpatch_hidden: int = 0  # 0: f is one linear layer; > 0: Linear → ReLU → Linear with this width
    reconpatch_projection_dim: int = 64  # output width of the projection layer g (trained, not used to score)
    reconpatch_projection_hidden: int = 0  # 0: g is one linear layer
    reconpatch_sigma: float = 1.0  # Gaussian kernel width, relative to the batch's mean squared distance
    reconpatch_k: int = 5  # neighbours of the contextual similarity
    reconpatch_alpha: float = 0.5  # w = α·w_pair + (1 − α)·w_ctx
    reconpatch_margin: float = 1.0  # m of the relaxed contrastive loss (distances are row-mean normalised)
    reconpatch_ema: float = 0.99  # γ of the EMA network that makes the pseudo-labels
    reconpatch_lr: float = 1e-4  # Adam
    reconpatch_steps: int = 100  # at most per f; training stops earlier on a plateau
    reconpatch_batch: int = 128  # patches per mini-batch, drawn from all training images
    reconpatch_patience: int = 3  # 25-step windows without a 0.5 % better loss before stopping
    reconpatch_per_fold: bool = True  # one f per fold (never sees its validation images) or one shared f

    def __post_init__(self) -> None:
        if self.backbone not in DEFAULT_LAYERS:
            raise ConfigError(f"backbone={self.backbone!r} is unknown; choose one of {sorted(DEFAULT_LAYERS)}")
        if not self.layers:
            object.__setattr__(self, "layers", DEFAULT_LAYERS[self.backbone])
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.target_dim is None:
            object.__setattr__(self, "target_dim", DEFAULT_TARGET_DIM[self.backbone])
        _check(self.image_size >= 32, f"image_size={self.image_size} must be at least 32")
        _check(self.patch_size >= 1 and self.patch_size % 2 == 1, f"patch_size={self.patch_size} must be odd")
        _check(self.align in ("finest", "coarsest"), f"align={self.align!r} must be 'finest' or 'coarsest'")
        _check(self.target_dim >= 0, f"target_dim={self.target_dim} must be >= 0 (0 keeps every channel)")
        _check(0.0 < self.coreset_ratio <= 1.0, f"coreset_ratio={self.coreset_ratio} must be in (0, 1]")
        _check(
            self.coreset_scope in ("fold", "part"),
            f"coreset_scope={self.coreset_scope!r} must be 'fold' (a coreset per fold) or 'part' (per disjoint part)",
        )
        _check(self.coreset_projection_dim >= 0, "coreset_projection_dim must be >= 0 (0: never project)")
        _check(self.k >= 1, f"k={self.k} must be >= 1")
        _check(
            self.reweight_neighbours >= 2,
            f"reweight_neighbours={self.reweight_neighbours} must be >= 2: eq. 7 is a softmax over m*'s "
            "neighbourhood, and over one neighbour it gives every image the score 0",
        )
        _check(self.tiles >= 1, f"tiles={self.tiles} must be >= 1 (1 = the whole image, no tiling)")
        _check(0.0 <= self.tile_overlap <= 0.5, f"tile_overlap={self.tile_overlap} must be in [0, 0.5]")
        _check(
            self.layer_weighting in ("none", "channels", "l2"),
            f"layer_weighting={self.layer_weighting!r} must be 'none', 'channels' or 'l2'",
        )
        _check(
            self.augment in ("none", "flips", "dihedral"),
            f"augment={self.augment!r} must be 'none', 'flips' (mirror images) or 'dihedral' (flips and 90° turns)",
        )
        _check(self.folds >= 2, f"folds={self.folds} must be at least 2 (each fold needs a validation part)")
        _check(
            self.threshold_aggregate in ("mean", "max", "median"),
            f"threshold_aggregate={self.threshold_aggregate!r} must be mean, max or median",
        )
        _check(self.score_aggregate in ("max", "mean"), f"score_aggregate={self.score_aggregate!r}")
        _check(
            self.threshold_rule in ("fold_max", "percentile", "gpd", "labelled"),
            f"threshold_rule={self.threshold_rule!r} must be fold_max, percentile or gpd "
            "(labelled only by waferwatch models calibrate)",
        )
        has_threshold = self.labelled_threshold is not None and math.isfinite(self.labelled_threshold)
        _check(
            (self.threshold_rule == "labelled") == has_threshold and (has_threshold or self.labelled_threshold is None),
            f"threshold_rule={self.threshold_rule!r} with labelled_threshold={self.labelled_threshold!r}: the rule "
            "labelled needs a finite labelled_threshold and the other rules none",
        )
        _check(
            0.0 < self.false_alarm_rate < 0.5,
            f"false_alarm_rate={self.false_alarm_rate} must be in (0, 0.5), e.g. 0.01 for 1% of good images",
        )
        _check(self.smoothing_sigma >= 0, f"smoothing_sigma={self.smoothing_sigma} must be >= 0")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        self._check_reconpatch()

    def _check_reconpatch(self) -> None:
        """The ReConPatch fields (checked whether or not the switch is on, so a manifest is never invalid)."""
        for name in ("reconpatch_dim", "reconpatch_projection_dim", "reconpatch_k", "reconpatch_steps"):
            _check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("reconpatch_hidden", "reconpatch_projection_hidden"):
            _check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0 (0: one linear layer)")
        _check(self.reconpatch_batch >= 2, f"reconpatch_batch={self.reconpatch_batch} must be >= 2 (pairs)")
        _check(self.reconpatch_sigma > 0, f"reconpatch_sigma={self.reconpatch_sigma} must be > 0")
        _check(0.0 <= self.reconpatch_alpha <= 1.0, f"reconpatch_alpha={self.reconpatch_alpha} must be in [0, 1]")
        _check(self.reconpatch_margin > 0, f"reconpatch_margin={self.reconpatch_margin} must be > 0")
        _check(0.0 <= self.reconpatch_ema < 1.0, f"reconpatch_ema={self.reconpatch_ema} must be in [0, 1)")
        _check(self.reconpatch_lr > 0, f"reconpatch_lr={self.reconpatch_lr} must be > 0")
        _check(self.reconpatch_patience >= 1, f"reconpatch_patience={self.reconpatch_patience} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        if data["labelled_threshold"] is None:
            del data["labelled_threshold"]  # configs from before calibration hash (and version) as they did
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCoreConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused so a newer manifest is not misread."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; this waferwatch is older than the model")
        values = dict(data)
        # Models saved before eq. 7 had its own neighbourhood took it from k: keep scoring them the same.
        values.setdefault("reweight_neighbours", max(2, int(values.get("k", 5))))
        values.setdefault("threshold_rule", "fold_max")
        values.setdefault("coreset_scope", "fold")  # models saved before the per-part coreset
        values.setdefault("score_aggregate", "max")  # the default before it was "mean"
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        return cls(**values)

    def replace(self, **changes: Any) -> PatchCoreConfig:
        """A copy with some fields changed (re-validated)."""
        if "backbone" in changes and "layers" not in changes:
            changes["layers"] = ()
        if "backbone" in changes and "target_dim" not in changes:
            changes["target_dim"] = None
        return dataclasses.replace(self, **changes)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


#: Named recipes: overrides of the product defaults. ``original`` is the Dacon-winning team's whole recipe, for
#: reproduction: wide_resnet101_2 layer2 + layer3 on PatchCore's finest grid pooled to 1024 dimensions, a 10%
#: coreset, k = 5 with eq. 7 over the same 5 neighbours, 5 folds, threshold = mean of the fold maxima,
#: score = max over folds. Its backbone needs a weights file (``--weights``).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "original": {
        "backbone": "wide_resnet101_2",
        "layers": ("layer2", "layer3"),
        "image_size": 224,
        "align": "finest",
        "target_dim": 1024,
        "coreset_ratio": 0.1,
        "coreset_scope": "fold",
        "k": 5,
        "reweight": True,
        "reweight_neighbours": 5,
        "folds": 5,
        "threshold_rule": "fold_max",
        "threshold_aggregate": "mean",
        "score_aggregate": "max",
        "tiles": 1,
        "layer_weighting": "none",
    },
}


def preset_config(name: str, **overrides: Any) -> PatchCoreConfig:
    """The config of preset ``name`` with explicit ``overrides`` on top (what a user typed wins)."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PatchCoreConfig().replace(**(PRESETS[name] | overrides))

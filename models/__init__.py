"""The ML core of waferwatch: a fold-ensemble PatchCore anomaly scorer.

Pure functions and small classes over tensors, arrays and files. Nothing here knows about Celery, SQL,
object storage or settings; callers pass a :class:`~models.config.PatchCoreConfig` and plain values.

Typical use::

    from models import PatchCoreConfig, FoldEnsemble, load_image_file

    ensemble = FoldEnsemble.fit(ids, paths, PatchCoreConfig())
    ensemble.save("model/")
    ensemble = FoldEnsemble.load("model/")
    results = ensemble.score_images([load_image_file(p) for p in paths], ids=ids)
"""

from models.config import PatchCoreConfig
from models.ensemble import FoldEnsemble, ImageScore
from models.errors import (
    ArtifactError,
    BackboneWeightsMissingError,
    BadImageError,
    ConfigError,
    ModelError,
)
from models.images import decode_image, load_image_file

__all__ = [
    "ArtifactError",
    "BackboneWeightsMissingError",
    "BadImageError",
    "ConfigError",
    "FoldEnsemble",
    "ImageScore",
    "ModelError",
    "PatchCoreConfig",
    "decode_image",
    "load_image_file",
]

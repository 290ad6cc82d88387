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

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.config import PatchCoreConfig
    from models.ensemble import FoldEnsemble, ImageScore
    from models.errors import ArtifactError, BackboneWeightsMissingError, BadImageError, ConfigError, ModelError
    from models.images import decode_image, load_image_file

# Exports resolve lazily (PEP 562) so that light users — the CLI's --help, settings, config parsing — do not
# pay for importing torch, faiss and torchvision.
_EXPORTS = {
    "PatchCoreConfig": "models.config",
    "FoldEnsemble": "models.ensemble",
    "ImageScore": "models.ensemble",
    "ArtifactError": "models.errors",
    "BackboneWeightsMissingError": "models.errors",
    "BadImageError": "models.errors",
    "ConfigError": "models.errors",
    "ModelError": "models.errors",
    "decode_image": "models.images",
    "load_image_file": "models.images",
}

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value

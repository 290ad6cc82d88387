"""Exceptions raised by the model core.

They are split by what a caller should do: :class:`BadImageError` is permanent for that image (record it,
do not retry); :class:`ArtifactError` means a model directory cannot be trusted; the rest are
configuration mistakes to fix before running again.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised by :mod:`models`."""


class ConfigError(ModelError, ValueError):
    """A configuration value is invalid; the message names the field and the accepted values."""


class BadImageError(ModelError):
    """An image cannot be decoded or is unsafe to decode (truncated, not an image, too many pixels).

    Permanent: retrying the same bytes gives the same error.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class BackboneWeightsMissingError(ModelError, FileNotFoundError):
    """Pretrained weights for a backbone are not on this machine (nothing is downloaded at run time)."""


class ArtifactError(ModelError):
    """A model directory is missing files, has a hash mismatch or an unsupported format version."""

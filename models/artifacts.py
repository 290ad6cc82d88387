"""Model directories: a JSON manifest plus one safetensors bank per fold, every file hashed.

No pickles anywhere: loading a model never executes code from the artifact. Loading checks the format
version, every file's sha256 and the consistency of the banks with the recorded config before anything
is scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from models.config import PatchCoreConfig
from models.errors import ArtifactError, ConfigError
from models.memory_bank import MemoryBank

if TYPE_CHECKING:
    from models.ensemble import Fold, FoldEnsemble

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_LIBRARIES = ("torch", "torchvision", "faiss-cpu", "numpy", "pillow", "safetensors", "scikit-learn")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensemble_version(ensemble: FoldEnsemble) -> str:
    """A content id: sha256 over the config, the training images' hashes and the banks' bytes (16 hex)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(ensemble.config.to_dict(), sort_keys=True).encode())
    for image in ensemble.training_images:
        digest.update(f"{image.id}\0{image.sha256}\n".encode())
    for fold in ensemble.folds:
        digest.update(np.ascontiguousarray(fold.bank.vectors).tobytes())
        digest.update(repr(fold.threshold).encode())
    if ensemble.representation is not None:  # ReConPatch f (and g)
        digest.update(ensemble.representation.fingerprint())
    return digest.hexdigest()[:16]


def save_ensemble(ensemble: FoldEnsemble, directory: Path, *, overwrite: bool = False) -> Path:
    """Write the model directory atomically: into a temporary sibling, renamed into place when complete.

    A directory that already holds files is refused unless ``overwrite``; then it is replaced as a whole
    (renamed aside, the new one renamed in, the old one deleted), so no file of the old model survives
    beside the new one and a reader sees the old model or the new one, never a mixture.

    Raises:
        ArtifactError: ``directory`` exists, is not empty and ``overwrite`` is false; or it is a file.
    """
    directory = Path(directory)
    _check_replaceable(directory, overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-new-"))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from workers running as another user
    try:
        _write_ensemble(ensemble, staging)
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _check_replaceable(directory: Path, *, overwrite: bool) -> None:
    if directory.is_file():
        raise ArtifactError(f"{directory} is a file; a model is written to a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        what = "a model" if (directory / MANIFEST).is_file() else "files"
        raise ArtifactError(
            f"{directory} already holds {what}; choose a new directory or replace it with overwrite=True "
            "(waferwatch train --overwrite)"
        )


def _move_into_place(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``; an existing ``directory`` is renamed aside first, then deleted."""
    if not directory.exists():
        staging.replace(directory)
        return
    old = directory.parent / f".{directory.name}-old-{uuid.uuid4().hex[:12]}"
    directory.replace(old)
    try:
        staging.replace(directory)
    except BaseException:
        old.replace(directory)  # put the old model back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_ensemble(ensemble: FoldEnsemble, directory: Path) -> None:
    """Banks first, the manifest (which names and hashes them) last, into an empty ``directory``."""
    files: dict[str, str] = {}
    folds = []
    for fold in ensemble.folds:
        name = f"fold_{fold.index}.safetensors"
        path = directory / name
        files[name] = _write_bank(path, fold.bank)
        folds.append(
            {
                "index": fold.index,
                "file": name,
                "threshold": fold.threshold,
                "bank_size": fold.bank.n_entries,
                "validation_ids": list(fold.validation_ids),
                "validation_scores": list(fold.validation_scores),
                "n_train_images": len(fold.train_ids),
            }
        )
    reconpatch = {}
    if ensemble.representation is not None:  # ReConPatch: its files are listed and hashed like the banks
        files.update(ensemble.representation.save(directory))
        reconpatch = {"reconpatch": ensemble.representation.describe()}
    calibration = {"calibration": ensemble.calibration} if ensemble.calibration is not None else {}
    manifest: dict[str, Any] = {
        **reconpatch,
        **calibration,
        "format_version": FORMAT_VERSION,
        "version": ensemble.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": ensemble.config.to_dict(),
        "backbone": ensemble.config.backbone,
        "layers": list(ensemble.config.layers),
        "seeds": {
            "kfold": ensemble.config.seed,
            "coreset": [ensemble.config.seed * 1_000 + f.index for f in ensemble.folds],
        },
        "embed_dim": ensemble.folds[0].bank.embed_dim,
        "grid": list(ensemble.grid),
        "threshold": ensemble.threshold,
        "fold_thresholds": list(ensemble.fold_thresholds),
        "folds": folds,
        "training_images": [{"id": t.id, "sha256": t.sha256} for t in ensemble.training_images],
        "skipped_images": ensemble.report.skipped,
        "timings_s": {k: round(v, 3) for k, v in ensemble.report.seconds.items()},
        "files": files,
        "environment": _environment(),
    }
    _write_json_atomic(directory / MANIFEST, manifest)


def save_fold(fold: Fold, directory: Path) -> list[Path]:
    """One fold on its own (``fold_<i>.safetensors`` + ``fold_<i>.json``), for rebuilds that build folds in
    separate tasks; :func:`load_fold` reads it back with its hash checked."""
    directory.mkdir(parents=True, exist_ok=True)
    bank_path = directory / f"fold_{fold.index}.safetensors"
    bank_sha256 = _write_bank(bank_path, fold.bank)
    meta = {
        "index": fold.index,
        "threshold": fold.threshold,
        "train_ids": list(fold.train_ids),
        "validation_ids": list(fold.validation_ids),
        "validation_scores": list(fold.validation_scores),
        "sha256": bank_sha256,
    }
    meta_path = directory / f"fold_{fold.index}.json"
    _write_json_atomic(meta_path, meta)
    return [bank_path, meta_path]


def load_fold(directory: Path, index: int) -> Fold:
    from models.ensemble import Fold

    meta = json.loads((directory / f"fold_{index}.json").read_text(encoding="utf-8"))
    bank_path = directory / f"fold_{index}.safetensors"
    if sha256_file(bank_path) != meta["sha256"]:
        raise ArtifactError(f"{bank_path} does not match the hash recorded in fold_{index}.json")
    bank = MemoryBank(load_file(str(bank_path))["bank"])
    return Fold(
        index,
        tuple(meta["train_ids"]),
        tuple(meta["validation_ids"]),
        float(meta["threshold"]),
        bank,
        validation_scores=tuple(meta.get("validation_scores", ())),
    )


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a waferwatch model directory: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON: {exc}") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version!r}; this waferwatch reads format {FORMAT_VERSION} (upgrade it)"
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Refuse a directory whose files are missing, differ from the hashes in its manifest, or are not listed
    in it (a model written over another one keeps the other's extra folds: a mixture that must not load)."""
    files = manifest.get("files") or {}
    if not files:
        raise ArtifactError(f"{directory / MANIFEST} lists no files")
    unlisted = sorted(path.name for path in directory.iterdir() if path.name != MANIFEST and path.name not in files)
    if unlisted:
        raise ArtifactError(
            f"{directory} holds {', '.join(unlisted)}, which {MANIFEST} does not list: the folder mixes files "
            "of more than one model; train again into an empty folder (waferwatch train --overwrite)"
        )
    for name, expected in sorted(files.items()):
        if Path(name).name != name:
            raise ArtifactError(f"{directory / MANIFEST} names a file outside the model directory: {name!r}")
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{path} has sha256 {actual[:12]}… but the manifest expects {expected[:12]}…: the model was "
                "modified or copied incompletely; rebuild or re-copy it"
            )


def load_ensemble(directory: Path, *, device: str | torch.device | None = "auto") -> FoldEnsemble:
    from models.ensemble import FitReport, Fold, FoldEnsemble, TrainingImage

    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    try:
        config = PatchCoreConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise ArtifactError(f"{directory / MANIFEST} has an invalid config: {exc}") from exc
    all_ids = [t["id"] for t in manifest["training_images"]]
    folds = []
    for entry in manifest["folds"]:
        tensors = load_file(str(directory / entry["file"]))
        bank = tensors.get("bank")
        if bank is None or bank.ndim != 2 or bank.shape != (entry["bank_size"], manifest["embed_dim"]):
            raise ArtifactError(f"{directory / entry['file']} does not hold a bank of the recorded shape")
        validation = tuple(entry["validation_ids"])
        held_out = set(validation)
        folds.append(
            Fold(
                index=entry["index"],
                train_ids=tuple(i for i in all_ids if i not in held_out),
                validation_ids=validation,
                threshold=float(entry["threshold"]),
                bank=MemoryBank(bank),
                validation_scores=tuple(entry.get("validation_scores", ())),
            )
        )
    representation = None
    if config.reconpatch:  # ReConPatch f per fold or shared, each file checked against the manifest's hash
        from models.reconpatch import PatchRepresentation

        entry = manifest.get("reconpatch") or {}
        if "in_dim" not in entry:
            raise ArtifactError(f"{directory / MANIFEST} has reconpatch on but no reconpatch entry; rebuild it")
        representation = PatchRepresentation.load(
            directory, dict(manifest["files"]), config, in_dim=int(entry["in_dim"]), n_folds=len(folds)
        )
    ensemble = FoldEnsemble(
        config,
        folds,
        representation=representation,
        training_images=[TrainingImage(**t) for t in manifest["training_images"]],
        grid=(int(manifest["grid"][0]), int(manifest["grid"][1])),
        device=device,
        report=FitReport(seconds=dict(manifest.get("timings_s", {})), skipped=list(manifest.get("skipped_images", []))),
        calibration=manifest.get("calibration"),
    )
    if ensemble.version != manifest["version"]:
        raise ArtifactError(
            f"{directory} recomputes to version {ensemble.version} but the manifest says {manifest['version']}"
        )
    if not np.isclose(ensemble.threshold, manifest["threshold"], rtol=0, atol=0):
        raise ArtifactError(f"{directory}: fold thresholds do not aggregate to the recorded threshold")
    return ensemble


def _write_bank(path: Path, bank: MemoryBank) -> str:
    """One fold's bank as safetensors (key ``bank``, float32); returns the file's sha256."""
    save_file({"bank": np.ascontiguousarray(bank.vectors, dtype=np.float32)}, str(path))
    return sha256_file(path)


def _environment() -> dict[str, Any]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "libraries": versions}


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    Path(temporary).replace(path)

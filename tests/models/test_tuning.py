"""``waferwatch tune``: the search space, deterministic rankings, and the command end to end."""

import json
import shutil
import subprocess
import sys

from bench.magnetic_tile import subsample
from models import PatchCoreConfig
from models.tuning import run_trials, search_space

CLI = [sys.executable, "-c", "from worker.cli import main; main()"]


def test_tiles_are_tried_only_where_each_tile_keeps_the_input_resolution():
    base = PatchCoreConfig()
    small = [name for name, _ in search_space(base, 300)]
    large = [name for name, _ in search_space(base, 700)]
    assert small[0] == "default" and not any(name.startswith("tiles") for name in small)
    assert "tiles 2x2" in large and "tiles 3x3" in large and "tiles 4x4" not in large


def test_the_search_space_holds_no_duplicate_config():
    configs = [config.to_dict() for _, config in search_space(PatchCoreConfig(), 1000)]
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)


def test_the_same_images_give_the_same_trial(tile_split):
    refs = subsample(tile_split.train, 30)
    candidates = [("small", PatchCoreConfig(folds=2, coreset_ratio=0.05))]
    first = run_trials([r.id for r in refs], [r.path for r in refs], candidates, device="cpu")
    again = run_trials([r.id for r in refs[::-1]], [r.path for r in refs[::-1]], candidates, device="cpu")
    assert first[0].synthetic_auroc == again[0].synthetic_auroc
    assert 0.0 <= first[0].synthetic_auroc <= 1.0


def test_tune_ranks_candidates_and_writes_the_best_model(tile_split, tmp_path):
    images, bad = tmp_path / "good", tmp_path / "bad"
    images.mkdir()
    bad.mkdir()
    for ref in subsample(tile_split.train, 24):
        shutil.copy(ref.path, images / ref.path.name)
        shutil.copy(ref.path.with_suffix(".png"), images / f"{ref.id}.png")  # its mask: --suffix skips it
    for ref in subsample(tile_split.test_bad, 6):
        shutil.copy(ref.path, bad / ref.path.name)
    out = tmp_path / "model"
    command = [*CLI, "tune", "--images", str(images), "--bad", str(bad), "--suffix", ".jpg"]
    result = subprocess.run(
        [*command, "--out", str(out), "--max-trials", "2"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    assert "ranked by real defects" in result.stderr
    assert "default" in result.stderr and "coreset" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["training_images"]) == 24
    again = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "--overwrite" in again.stderr

"""minio-init's script, run by ``sh`` with the environment compose gives it, against a stand-in ``mc``.

``fake_mc.py`` keeps MinIO's rules (see its docstring): the only notification targets are the ARNs that the
minio service's ``MINIO_NOTIFY_WEBHOOK_ENABLE_<ID>`` variables create, with the id exactly as written. So
the script must attach every rule to that exact ARN, fail when a rule cannot be added (no ``|| true``),
check ``mc event ls`` itself, and stay idempotent on the next ``docker compose up``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compose_model import env_example, interpolate, load_compose, service_environment

FAKE_MC = Path(__file__).with_name("fake_mc.py")
PREFIXES = ("incoming/", "nominal/")
SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".PNG", ".JPG", ".JPEG", ".TIF", ".TIFF", ".BMP")


def minio_target_arns(minio_environment: dict[str, str]) -> list[str]:
    """The webhook ARNs the MinIO server creates from its environment (``..._ENABLE_<ID>=on``)."""
    arns = []
    for key, value in sorted(minio_environment.items()):
        match = re.fullmatch(r"MINIO_NOTIFY_WEBHOOK_ENABLE_(\w+)", key)
        if match and value.lower() in ("on", "true", "yes", "1"):
            arns.append(f"arn:minio:sqs::{match.group(1)}:webhook")
    return arns


def run_minio_init(tmp_path: Path, arns: list[str], mc_program: Path = FAKE_MC) -> subprocess.CompletedProcess[str]:
    """minio-init's entrypoint + command, as compose runs it, with ``mc`` being ``mc_program``."""
    services = load_compose()["services"]
    init = services["minio-init"]
    variables = env_example()
    entrypoint = [interpolate(str(word), variables) for word in init["entrypoint"]]
    assert entrypoint == ["/bin/sh", "-c"], entrypoint
    script = interpolate(init["command"][0] if isinstance(init["command"], list) else init["command"], variables)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mc").write_text(f'#!/bin/sh\nexec {sys.executable} {mc_program} "$@"\n')
    (bin_dir / "mc").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_MC_STATE": str(tmp_path / "mc-state.json"),
        "FAKE_MINIO_ARNS": " ".join(arns),
        **service_environment(init, variables),
    }
    shell = shutil.which("sh")
    assert shell
    return subprocess.run([shell, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False)


def rules(tmp_path: Path) -> set[tuple[str, str, str]]:
    state = json.loads((tmp_path / "mc-state.json").read_text())
    bucket = env_example().get("WAFERWATCH_S3_BUCKET", "waferwatch")
    return {(rule["arn"], rule["prefix"], rule["suffix"]) for rule in state["buckets"][bucket]["rules"]}


def test_minio_init_attaches_every_rule_to_the_target_minio_creates(tmp_path: Path) -> None:
    services = load_compose()["services"]
    arns = minio_target_arns(service_environment(services["minio"], env_example()))
    assert arns == ["arn:minio:sqs::WAFERWATCH:webhook"]
    result = run_minio_init(tmp_path, arns)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = {(arns[0], prefix, suffix) for prefix in PREFIXES for suffix in SUFFIXES}
    assert rules(tmp_path) == expected
    again = run_minio_init(tmp_path, arns)  # every `docker compose up` runs it again
    assert again.returncode == 0, again.stdout + again.stderr
    assert rules(tmp_path) == expected


@pytest.mark.parametrize(
    "arns",
    [
        [],  # MinIO started without the webhook target (or with another id)
        ["arn:minio:sqs::waferwatch:webhook"],  # the id lower-cased: not the one the env suffix creates
    ],
    ids=["no-target", "other-case"],
)
def test_minio_init_fails_when_the_rules_cannot_be_added(tmp_path: Path, arns: list[str]) -> None:
    """A bucket without notification rules never scores an image: minio-init must exit non-zero, so
    ingest (which waits for it to complete successfully) does not start green on top of it."""
    result = run_minio_init(tmp_path, arns)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "ARN does not exist" in result.stderr


def test_minio_init_fails_when_event_ls_lacks_a_rule(tmp_path: Path) -> None:
    """The final check reads ``mc event ls``: a rule that did not land (here: mc "added" it, then lost it)
    fails the script even though every ``mc event add`` exited 0."""
    services = load_compose()["services"]
    arns = minio_target_arns(service_environment(services["minio"], env_example()))
    lossy = tmp_path / "lossy_mc.py"
    lossy.write_text(
        "import runpy, sys, json, os\n"
        "code = 0\n"
        "try:\n"
        f"    runpy.run_path({str(FAKE_MC)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code if isinstance(exit.code, int) else 1\n"
        "    if not isinstance(exit.code, int) and exit.code is not None: print(exit.code, file=sys.stderr)\n"
        "if sys.argv[1:3] == ['event', 'add']:\n"
        "    path = os.environ['FAKE_MC_STATE']\n"
        "    state = json.load(open(path))\n"
        "    for bucket in state['buckets'].values():\n"
        "        bucket['rules'] = [r for r in bucket['rules'] if r['suffix'] != '.TIFF']\n"
        "    json.dump(state, open(path, 'w'))\n"
        "sys.exit(code)\n"
    )
    result = run_minio_init(tmp_path, arns, mc_program=lossy)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "no notification rule for incoming/*.TIFF" in result.stderr


def test_minio_init_script_has_no_swallowed_failures() -> None:
    script = "\n".join(load_compose()["services"]["minio-init"]["command"])
    assert "|| true" not in script and "||true" not in script
    assert script.lstrip().startswith("set -e")
    assert "--ignore-existing" in script

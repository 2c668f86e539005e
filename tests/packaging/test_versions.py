"""One version for every package under packages/, and adapters pin the core to it."""

import pathlib
import re
import tomllib

import mamba_ssm_core

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = sorted((ROOT / "packages").glob("*/pyproject.toml"))


def _project(path: pathlib.Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_packages_found():
    names = {_project(p)["name"] for p in PACKAGES}
    assert "mamba-ssm-core" in names


def test_one_version_for_all_packages():
    versions = {_project(p)["name"]: _project(p)["version"] for p in PACKAGES}
    assert len(set(versions.values())) == 1, f"package versions drifted: {versions}"
    assert mamba_ssm_core.__version__ == versions["mamba-ssm-core"]


def test_adapters_pin_core_to_the_same_version():
    core_version = _project(ROOT / "packages/mamba-ssm-core/pyproject.toml")["version"]
    for path in PACKAGES:
        project = _project(path)
        if project["name"] == "mamba-ssm-core":
            continue
        pins = [d for d in project["dependencies"] if re.match(r"mamba-ssm-core\b", d)]
        assert pins == [f"mamba-ssm-core=={core_version}"], (
            f"{project['name']} must pin mamba-ssm-core=={core_version}, got {pins}"
        )

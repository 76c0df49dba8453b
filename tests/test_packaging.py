"""The package as pip installs it: the wheel ``python -m build`` makes holds the code, the shared override files and
the ``monai-fedpriv`` command, with the version the bundles' metadata names (the install in a clean venv itself is
``make wheel-check``: it downloads torch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_package_its_configs_the_command_and_the_extras(tmp_path):
    pytest.importorskip("build")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "monai_fedpriv", src / "monai_fedpriv", ignore=shutil.ignore_patterns("__pycache__"))
    argv = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("monai_fedpriv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "monai_fedpriv").rglob("*") if p.suffix in (".py",
               ".json") and "__pycache__" not in p.parts}  # fmt: skip
    assert shipped <= names, sorted(shipped - names)[:5]
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = zipfile.ZipFile(wheel).read(info).decode()
    assert f"Version: {version('monai-fedpriv')}" in meta
    assert {"Provides-Extra: tracking", "Provides-Extra: deploy", "Provides-Extra: networks"} <= set(meta.splitlines())
    entry = zipfile.ZipFile(wheel).read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "monai-fedpriv = monai_fedpriv.cli:main" in entry
    for bundle in sorted((REPO / "bundles").glob("*/configs/metadata.json")):  # what the bundles tell MONAI to install
        listed = json.loads(bundle.read_text())["required_packages_version"]["monai_fedpriv"]
        assert listed == version("monai-fedpriv"), bundle

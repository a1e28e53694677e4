"""What `pip install epmoe` puts in site-packages: everything under `epmoe/`, nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import REPO


def test_wheel_installs_comm_and_launch_inside_epmoe_only(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("epmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"epmoe", wheel.name.split("-py")[0] + ".dist-info"}
    for expected in ("epmoe/comm/__init__.py", "epmoe/launch/__init__.py", "epmoe/conf/config.yaml",
                     "epmoe/conf/model/moe_small.yaml", "epmoe/train/__main__.py"):  # fmt: skip
        assert expected in names
    for package in (REPO / "epmoe").rglob("__init__.py"):  # every package under epmoe/, none forgotten in setup.py
        assert str(package.relative_to(REPO)) in names

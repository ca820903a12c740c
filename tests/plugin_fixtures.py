"""Installs the example plugin package the way a third party would: `pip install` into this interpreter.

conftest.py imports ``colorhist_plugin`` from here so any test (including the
end-to-end server tests) can rely on the plugin being discoverable through
its entry point. The install is idempotent and skipped when the installed copy
already matches the sources, so repeated runs cost nothing.
"""

from __future__ import annotations

import functools
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "imagesearch-colorhist"
EXAMPLE_DIST = "imagesearch-colorhist"
EXAMPLE_MODULE = "imagesearch_colorhist"
EXAMPLE_PLUGIN = "colorhist"  # the entry-point name, i.e. the plugin name imagesearch reports


def _declared_entry_points(project: dict) -> set[tuple[str, str, str]]:
    return {
        (group, name, value)
        for group, entries in project.get("entry-points", {}).items()
        for name, value in entries.items()
    }


def _is_editable_install_of_example(dist: metadata.Distribution) -> bool:
    raw = dist.read_text("direct_url.json")
    if not raw:
        return False
    info = json.loads(raw)
    return bool(info.get("dir_info", {}).get("editable")) and info.get("url") == EXAMPLE_DIR.as_uri()


def installed_example_is_current() -> bool:
    """True when the installed distribution has the sources' version, entry points and code."""
    try:
        dist = metadata.distribution(EXAMPLE_DIST)
    except metadata.PackageNotFoundError:
        return False
    project = tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())["project"]
    if dist.version != project["version"]:
        return False
    if {(ep.group, ep.name, ep.value) for ep in dist.entry_points} != _declared_entry_points(project):
        return False
    if _is_editable_install_of_example(dist):
        return True  # an editable install always runs the current sources
    source = {
        path.relative_to(EXAMPLE_DIR).as_posix(): path.read_bytes()
        for path in (EXAMPLE_DIR / EXAMPLE_MODULE).rglob("*.py")
    }
    installed = {
        file.as_posix(): Path(dist.locate_file(file)).read_bytes()
        for file in dist.files or ()
        if file.parts[0] == EXAMPLE_MODULE and file.suffix == ".py"
    }
    return installed == source


@functools.cache
def ensure_example_plugin_installed() -> str:
    """Pip-install examples/imagesearch-colorhist unless already current; return its plugin name.

    Built from a temporary copy so the work tree gets no build/ or egg-info
    litter (and a stale build/ can never leak old files into the wheel).
    ``--no-index --no-deps --no-build-isolation`` keep it offline: imagesearch,
    numpy, OpenCV and setuptools are already in the environment.
    """
    if installed_example_is_current():
        return EXAMPLE_PLUGIN
    with tempfile.TemporaryDirectory(prefix="imagesearch-plugin-") as tmp:
        source = Path(tmp) / EXAMPLE_DIR.name
        shutil.copytree(
            EXAMPLE_DIR,
            source,
            ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"),
        )
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--no-input",
            str(source),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"installing {EXAMPLE_DIR} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    importlib.invalidate_caches()  # let this process see the new site-packages entries
    if not installed_example_is_current():
        raise RuntimeError(f"pip reported success but {EXAMPLE_DIST} is not visible to {sys.executable}")
    return EXAMPLE_PLUGIN


@pytest.fixture(scope="session")
def colorhist_plugin() -> str:
    """The example plugin, pip-installed and discoverable through its entry point; yields its name."""
    return ensure_example_plugin_installed()

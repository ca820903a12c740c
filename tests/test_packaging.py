"""The client install (no extras) is a working client without any server dependency.

A subprocess blocks the server's heavy dependencies (and the server's own
packages) at import time, imports the client and makes real calls against the
fake server. The pyproject checks keep the declared dependency list honest.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Import names the client must never need, and the distributions that provide them.
# grpc itself tries grpc_tools / grpc_health / grpc_reflection and does without them.
BLOCKED_MODULES = (
    "faiss",
    "cv2",
    "onnxruntime",
    "pluggy",
    "torch",
    "grpc_health",
    "grpc_reflection",
    "grpc_tools",
)
BLOCKED_PACKAGES = ("imagesearch.server", "imagesearch.plugins")
SERVER_DISTRIBUTIONS = {
    "faiss",
    "faiss-cpu",
    "faiss-gpu",
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "onnxruntime",
    "onnxruntime-gpu",
    "pluggy",
    "torch",
    "grpcio-health-checking",
    "grpcio-reflection",
}

CLIENT_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED_MODULES = {blocked_modules!r}
    BLOCKED_PACKAGES = {blocked_packages!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED_MODULES or any(
                name == package or name.startswith(package + ".") for package in BLOCKED_PACKAGES
            ):
                raise ImportError(f"blocked for the client-only test: {{name}}")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import faiss  # installed in the dev venv: the blocker must stop it
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    import importlib, pkgutil
    import imagesearch.client as isc
    from tests.support.fake_server import fake_server

    for module in pkgutil.walk_packages(isc.__path__, "imagesearch.client."):
        importlib.import_module(module.name)  # every client module, not just the ones __init__ loads

    with fake_server(with_health=False) as (servicer, target):
        with isc.ImageSearchClient(target) as client:
            result = client.search(image=b"jpeg", top_k=2, labels=["a"])
            assert result.ids == ["hit-0", "hit-1"], result
            added = client.add_images([isc.ImageItem(id="v", vector=[1.0, 2.0])])
            assert added.ids == ("v",), added
            try:
                client.get_image("missing")
            except isc.NotFound as error:
                assert error.reason == "IMAGE_NOT_FOUND", error
            else:
                raise SystemExit("NotFound was not raised")
    print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
    """
)


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _declared() -> dict[str, str]:
    return {_requirement_name(req): req for req in PYPROJECT["project"]["dependencies"]}


def _installed_closure(names: set[str]) -> set[str]:
    """The distributions ``names`` pull in when installed without extras (as in this venv)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(_requirement_name(requirement))
    return seen


def test_client_works_with_server_dependencies_blocked() -> None:
    script = CLIENT_SCRIPT.format(blocked_modules=BLOCKED_MODULES, blocked_packages=BLOCKED_PACKAGES)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))

    # Every third-party module the client loaded comes from a declared dependency (or theirs).
    providers = metadata.packages_distributions()
    declared = _installed_closure(set(_declared()))
    third_party = {
        name
        for name in imported
        if name not in sys.stdlib_module_names
        and not name.startswith("_")
        and name not in {"imagesearch", "tests", "cython_runtime"}
    }
    undeclared = {
        name: providers.get(name, ["?"])
        for name in third_party
        if not declared & {_requirement_name(dist) for dist in providers.get(name, [])}
    }
    assert not undeclared, f"the client imports modules of undeclared distributions: {undeclared}"
    assert "grpc" in third_party and "numpy" in third_party  # the check above saw real imports


def test_project_dependencies_are_client_only() -> None:
    declared = _declared()
    assert {"grpcio", "grpcio-status", "protobuf", "numpy"} <= set(declared)
    assert not set(declared) & SERVER_DISTRIBUTIONS, declared
    server_extra = {_requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["server"]}
    assert {"faiss-cpu", "opencv-python-headless", "onnxruntime", "pluggy"} <= server_extra


def _floor(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9.]+)", requirement)
    assert match, f"{requirement!r} has no >= lower bound"
    return tuple(int(part) for part in match.group(1).split("."))


def test_grpcio_floor_covers_the_generated_code() -> None:
    """The generated stubs refuse to import on a grpcio older than the grpcio-tools that made them."""
    from imagesearch.v1 import image_search_service_pb2_grpc as generated

    needed = tuple(int(part) for part in generated.GRPC_GENERATED_VERSION.split("."))
    requirement = _declared()["grpcio"]
    wanted = f"grpcio>={generated.GRPC_GENERATED_VERSION}"
    assert _floor(requirement) >= needed, (
        f"pyproject says {requirement!r} but the generated code needs {wanted}"
    )

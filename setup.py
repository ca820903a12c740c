"""Packaging hook: generate the gRPC bindings from protos/ before building.

Everything declarative lives in pyproject.toml; this file only makes
`pip install .` from a clean checkout produce `imagesearch.v1`.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithGeneratedProtos(build_py):
    """Run protos/codegen.py so the wheel always matches the .proto files."""

    def run(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "protos"))
        import codegen

        codegen.generate()
        super().run()


setup(cmdclass={"build_py": BuildWithGeneratedProtos})

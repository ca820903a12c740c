"""The JSON sidecar written beside every exported ONNX model, and the only thing the server reads.

It says how to feed the model (preprocessing), what comes out (output names,
dim), and where the model came from (weights source, licence, sha256), so a
model is self-describing and the plugin needs no per-model code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesearch.plugins.cnn.recipes import Preprocessing
from imagesearch.server.files import atomic_write_bytes

FORMAT = "imagesearch-onnx-model"
FORMAT_VERSION = 1


class SidecarError(ValueError):
    """A sidecar is missing, unreadable or inconsistent with its model file."""


@dataclass(frozen=True)
class Sidecar:
    name: str
    version: str  # the recipe's version; the extractor version adds the model's sha256
    description: str
    dim: int
    preprocessing: Preprocessing
    onnx_file: str  # file name, relative to the sidecar's folder
    sha256: str  # of the ONNX file
    size_bytes: int
    input_name: str = "input"
    embedding_output: str = "embedding"
    logits_output: str | None = "logits"
    num_classes: int | None = 1000
    architecture: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)
    exported_with: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "architecture": self.architecture,
            "params": dict(self.params),
            "dim": self.dim,
            "num_classes": self.num_classes,
            "input": {"name": self.input_name, "layout": "NCHW", "dtype": "float32"},
            "outputs": {"embedding": self.embedding_output, "logits": self.logits_output},
            "preprocessing": self.preprocessing.to_dict(),
            "onnx": {"file": self.onnx_file, "sha256": self.sha256, "size_bytes": self.size_bytes},
            "source": dict(self.source),
            "exported_with": dict(self.exported_with),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sidecar:
        if data.get("format") != FORMAT:
            raise SidecarError(f"not an imagesearch model sidecar (format {data.get('format')!r})")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise SidecarError(
                f"sidecar format_version {data['format_version']} is newer than this server reads"
            )
        try:
            outputs = data.get("outputs", {})
            onnx = data["onnx"]
            dim = int(data["dim"])
            if dim <= 0:
                raise SidecarError(f"dim must be positive, got {dim}")
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                description=str(data.get("description", "")),
                dim=dim,
                preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                onnx_file=str(onnx["file"]),
                sha256=str(onnx["sha256"]),
                size_bytes=int(onnx["size_bytes"]),
                input_name=str(data.get("input", {}).get("name", "input")),
                embedding_output=str(outputs.get("embedding", "embedding")),
                logits_output=outputs.get("logits"),
                num_classes=data.get("num_classes"),
                architecture=str(data.get("architecture", "")),
                params=data.get("params", {}),
                source=data.get("source", {}),
                exported_with=data.get("exported_with", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SidecarError):
                raise
            raise SidecarError(f"invalid sidecar: {type(exc).__name__}: {exc}") from exc

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]


def read_sidecar(path: Path) -> Sidecar:
    """Parse and validate the sidecar at ``path``; SidecarError names the file on any problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SidecarError(f"{path}: cannot read sidecar: {exc}") from exc
    if not isinstance(data, dict):
        raise SidecarError(f"{path}: sidecar is not a JSON object")
    try:
        return Sidecar.from_dict(data)
    except SidecarError as exc:
        raise SidecarError(f"{path}: {exc}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_sidecar(path: Path, sidecar: Sidecar) -> None:
    text = json.dumps(sidecar.to_dict(), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))

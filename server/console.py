"""Console output of the CLI: the ready banner and the plugin table."""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
from collections.abc import Iterator

from imagesearch.plugins import manager
from imagesearch.server.app import plugin_registry
from imagesearch.server.config import ServerConfig


def print_ready_banner(running) -> None:
    engine, config, port, target = running.engine, running.config, running.port, running.target
    plugins = engine.list_plugins()
    collections = ", ".join(f"{c.spec.name} ({c.image_count} images)" for c in engine.collections()) or "none"
    print(
        f"""
imagesearch is serving on {config.host}:{port}
  data:        {config.data_dir}
  collections: {collections}
  extractors:  {", ".join(e.name for e in plugins.extractors) or "none (run `make models`)"}
  metrics:     {", ".join(m.name for m in plugins.metrics)}

Query it:
  grpcurl -plaintext {target} list
  grpcurl -plaintext -d "{{\\"image\\": \\"$(base64 -w0 photo.jpg)\\", \\"top_k\\": 3}}" \\
      {target} imagesearch.v1.ImageSearchService/Search
  {shlex.quote(sys.executable)} -c "from imagesearch.client import ImageSearchClient as C; \\
print(C('{target}').search('photo.jpg', top_k=3))"
""",
        flush=True,
    )


@contextlib.contextmanager
def _problems_not_logged() -> Iterator[None]:
    """The registry logs each problem as a warning, which a server needs; this command prints them
    itself, so the log said each one a second time on stderr (an outside test)."""
    level = manager.log.level
    manager.log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        manager.log.setLevel(level)


def print_plugins(config: ServerConfig) -> int:
    with _problems_not_logged():
        registry = plugin_registry(config)
    print("extractors:")
    for name, registered in sorted(registry.extractors.items()):
        item = registered.item
        print(f"  {name:<24} dim {item.dim:<5} v{item.version:<16} from {registered.plugin}")
    print("metrics:")
    for name, registered in sorted(registry.metrics.items()):
        print(f"  {name:<24} {registered.item.description}  (from {registered.plugin})")
    print("local features:")
    for name, registered in sorted(registry.local_features.items()):
        print(
            f"  {name:<24} v{registered.item.version:<4} {registered.item.description}  (from {registered.plugin})"
        )
    for problem in registry.problems:
        print(f"problem: {problem}")
    return 1 if registry.problems else 0

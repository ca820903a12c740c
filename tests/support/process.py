"""Start a real server process and wait until it prints its port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """A server subprocess; ``port`` is parsed from its output (the server picked a free one)."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        ready: str = r"PORT (\d+)",
        timeout: float = 120,
    ):
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        found = threading.Event()
        self.port = 0

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                match = re.search(ready, line)
                if match and not found.is_set():
                    self.port = int(match.group(1))
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("server did not start:\n" + "".join(self.output))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; on a hang, dump the server's thread stacks (SIGUSR1) into the error."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("server did not stop on SIGTERM:\n" + "".join(self.output)) from None


def tiny_server(data_dir: Path, *overrides: str) -> ServerProcess:
    return ServerProcess([sys.executable, "-m", "tests.support.serve_tiny", str(data_dir), *overrides])

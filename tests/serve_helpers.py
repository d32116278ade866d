"""Starting a real ``clipseg serve`` process for tests and benchmarks, and talking to it.

The server runs as the user runs it: a subprocess of the console script, on an ephemeral port
of 127.0.0.1 (``--port 0``; the URL is its first line on stdout), its request log (stderr) in a
file. :meth:`Served.stop` always stops it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLIPSEG = Path(sys.executable).with_name("clipseg")


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log: Path
    token: str | None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log_lines(self) -> list[dict]:
        """The request log so far (JSON lines; other lines are the server's notices)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(args: list[str], log: Path, token: str | None = None, wait: float = 180) -> Served:
    """``clipseg serve ARGS --port 0`` (plus ``--token``), once it prints its URL.

    Raises:
        RuntimeError: it exited or printed nothing within ``wait`` seconds (with its stderr).
    """
    command = [str(CLIPSEG), "serve", *args, "--port", "0"]
    if token is not None:
        command += ["--token", token]
    handle = log.open("w")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=handle, text=True, env=dict(os.environ)
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(wait)
    if not first or not first[0].startswith("http://"):
        process.kill()
        process.wait(10)
        raise RuntimeError(f"clipseg serve did not start: {log.read_text()[-3000:]}")
    served = Served(first[0].strip(), process, log, token)
    return served


def wait_until(check, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()

"""``chainserve serve`` as a child process, started the way a user starts it (the CLI), for the
end-to-end tests and the live experiments: wait for its ready line, hand out its URL, stop it with
SIGTERM (it stops its block servers) and wait for it to exit; :meth:`ServeProcess.cpu_s` reads the CPU
its processes have used."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

#: The line ``chainserve serve`` prints on stdout once its API listens.
READY = re.compile(r"chainserve: (?:serving \S+|standing by for \S+) on (http://\S+)")


class ServeFailed(RuntimeError):
    """``chainserve serve`` exited or stayed silent before it was ready, or ignored SIGTERM."""


@dataclass(frozen=True, slots=True)
class ServeProcess:
    """A running ``chainserve serve``: its API's ``url`` and its process."""

    url: str
    proc: subprocess.Popen

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by ``chainserve serve`` and its live descendants
        (its block servers): a process that has exited no longer counts."""
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return total
        for p in family:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total


@contextmanager
def serve_process(args: Sequence[str], log_path: Path, ready_s: float = 300.0) -> Iterator[ServeProcess]:
    """Run ``chainserve serve ARGS`` (stderr to ``log_path``) until the block ends; raises
    :class:`ServeFailed` with the log's tail if it is not ready within ``ready_s`` or ignores SIGTERM."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        argv = [sys.executable, "-m", "chainserve", "serve", *args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        url = _ready_url(proc, ready_s)
        if url is None:
            proc.kill()
            proc.wait()
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise ServeFailed(f"chainserve serve was not ready within {ready_s:g} s: {' | '.join(tail)}")
        yield ServeProcess(url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise ServeFailed("chainserve serve ignored SIGTERM") from None


def _ready_url(proc: subprocess.Popen, ready_s: float) -> str | None:
    """The URL of the ready line, read by a thread so that a silent process cannot block past ``ready_s``."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + ready_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return None
        if not line:
            return None
        match = READY.search(line)
        if match:
            return match.group(1)
    return None

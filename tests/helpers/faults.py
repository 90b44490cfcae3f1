"""Fault injection for the Ray tests: SIGKILL one Ray Train worker of this session's local cluster mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


class RayTrainWorkerKiller:
    """A context manager whose thread waits until ``after`` exists (e.g. a checkpoint's ``meta.json``), then
    SIGKILLs one Ray Train worker process (``ray::RayTrainWorker``) descending from this process (the test's
    ``ray.init`` started the cluster) and records its pid in :attr:`killed`. It gives up after ``deadline_s``
    seconds, or as soon as the ``with`` block is left (the run ended before ``after`` appeared)."""

    def __init__(self, after: Path, deadline_s: float = 240.0):
        self.after, self.deadline_s = Path(after), deadline_s
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._kill_once, daemon=True)

    def _kill_once(self) -> None:
        import psutil

        deadline = time.time() + self.deadline_s
        while time.time() < deadline and not self.after.exists():
            if self._stop.wait(0.05):
                return
        workers = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline() or []):
                    workers.append(proc)
            except psutil.Error:  # a process that exited while we looked
                continue
        if workers and self.after.exists():
            os.kill(workers[-1].pid, signal.SIGKILL)
            self.killed.append(workers[-1].pid)

    def __enter__(self) -> "RayTrainWorkerKiller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

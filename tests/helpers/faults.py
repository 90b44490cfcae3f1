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
    seconds; leaving the ``with`` block waits for the thread."""

    def __init__(self, after: Path, deadline_s: float = 240.0):
        self.after, self.deadline_s = Path(after), deadline_s
        self.killed: list[int] = []
        self._thread = threading.Thread(target=self._kill_once, daemon=True)

    def _kill_once(self) -> None:
        import psutil

        deadline = time.time() + self.deadline_s
        while time.time() < deadline and not self.after.exists():
            time.sleep(0.05)
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline() or [])]
        if workers and self.after.exists():
            os.kill(workers[-1].pid, signal.SIGKILL)
            self.killed.append(workers[-1].pid)

    def __enter__(self) -> "RayTrainWorkerKiller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join()

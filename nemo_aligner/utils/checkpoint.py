"""Checkpoint directory bookkeeping: naming, finding the latest, keeping the top-k by a monitored metric.

Layout under ``<log_dir>/checkpoints/``: one directory per save, ``step=<N>`` holding ``state.pt`` and
``meta.json`` (written last by the model's atomic save). Directories starting with ``.`` are incomplete temporaries
and are ignored (and removed on the next save).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path


class CheckpointManager:
    """Chooses where to save, which checkpoint to resume from and which ones to delete.

    Args:
        directory: the ``checkpoints`` directory.
        save_top_k: keep this many checkpoints with the best ``monitor`` value (``-1`` keeps all). The most recent
            checkpoint is always kept as well, so a run can resume.
        monitor: metric name stored in each checkpoint's ``meta.json`` (e.g. ``val_loss``).
        mode: ``min`` or ``max``.

    Raises:
        ValueError: ``mode`` is neither ``min`` nor ``max``.
    """

    def __init__(self, directory: str | Path, save_top_k: int = 1, monitor: str = "val_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"checkpoint_callback_params.mode={mode!r}: use 'min' or 'max'")
        self.directory = Path(directory)
        self.save_top_k = int(save_top_k)
        self.monitor = monitor
        self.mode = mode

    def path_for(self, step: int) -> Path:
        """Directory of the checkpoint taken after optimizer step ``step``."""
        return self.directory / f"step={step:07d}"

    def checkpoints(self) -> list[tuple[Path, dict]]:
        """Complete checkpoints as ``(path, meta)``, oldest step first."""
        found = []
        if not self.directory.is_dir():
            return found
        for path in self.directory.iterdir():
            meta_file = path / "meta.json"
            if path.name.startswith(".") or not meta_file.is_file():
                continue
            try:
                meta = json.loads(meta_file.read_text())
            except json.JSONDecodeError:
                continue
            found.append((path, meta))
        return sorted(found, key=lambda item: int(item[1].get("step", -1)))

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None."""
        found = self.checkpoints()
        return found[-1][0] if found else None

    def _score(self, meta: dict) -> float:
        value = meta.get("metrics", {}).get(self.monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        return float(value) if self.mode == "min" else -float(value)

    def prune(self) -> list[Path]:
        """Delete checkpoints outside the top-k (never the latest) and stale temporaries; return what was removed."""
        removed = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith(".") and (".tmp" in path.name or ".old" in path.name):
                    shutil.rmtree(path, ignore_errors=True)
        found = self.checkpoints()
        if self.save_top_k < 0 or not found:
            return removed
        latest = found[-1][0]
        ranked = sorted(found, key=lambda item: (self._score(item[1]), -int(item[1].get("step", 0))))
        keep = {path for path, _ in ranked[: self.save_top_k]} | {latest}
        for path, _ in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def best(self) -> Path | None:
        """The checkpoint with the best monitored value (ties: the latest), or None."""
        found = self.checkpoints()
        if not found:
            return None
        return min(found, key=lambda item: (self._score(item[1]), -int(item[1].get("step", 0))))[0]

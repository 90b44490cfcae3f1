"""Checkpoint directory bookkeeping: naming, finding the latest, keeping the top-k by a monitored metric.

Layout under ``<log_dir>/checkpoints/``: one directory per save, ``step=<N>`` holding ``state.pt`` and
``meta.json`` (written last by the model's atomic save). Directories starting with ``.`` are incomplete temporaries
and are ignored (and removed on the next save).

A ``step=<N>`` directory whose ``meta.json`` is missing, unparseable or lacks an integer ``step``, or whose
``state.pt`` is missing or truncated (a single-file ``state.pt`` must be a complete zip archive, as ``torch.save``
writes it; a sharded one a directory with its ``.metadata``), is *damaged*: it is never resumed from, ranked or
pruned (it is left for inspection), and :meth:`CheckpointManager.damaged` reports it.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

from nemo_aligner.errors import UserError
from nemo_aligner.utils.config import ConfigValueError


class NonFiniteError(UserError, ValueError):
    """Training produced a non-finite (NaN or infinite) loss, gradient norm or weight. The optimizer step was
    skipped and nothing non-finite was saved; the message names the step and what was non-finite."""


class DamagedCheckpointError(UserError, ValueError):
    """A checkpoint cannot be resumed from (and no older valid one exists); the message names its path."""


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from, or None if it looks complete.

    Checks ``meta.json`` (present, a JSON object with an integer ``step``) and ``state.pt`` (present; a file must
    be a complete zip archive, which is how ``torch.save`` writes it, so a truncated one is caught before loading;
    a directory, a sharded FSDP checkpoint, must hold its ``.metadata``). Cheap: reads ``meta.json`` and the end of
    ``state.pt`` only.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"meta.json is not valid JSON ({err})"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return "meta.json has no integer 'step'"
    state = path / "state.pt"
    if state.is_dir():
        if not (state / ".metadata").is_file():
            return "state.pt/.metadata is missing (incomplete sharded checkpoint)"
    elif not state.is_file():
        return "state.pt is missing"
    elif state.stat().st_size == 0 or not zipfile.is_zipfile(state):
        return f"state.pt is truncated or corrupt ({state.stat().st_size} bytes, not a complete torch.save archive)"
    return None


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
            raise ConfigValueError(f"checkpoint_callback_params.mode={mode!r}: use 'min' or 'max'")
        self.directory = Path(directory)
        self.save_top_k = int(save_top_k)
        self.monitor = monitor
        self.mode = mode

    def path_for(self, step: int) -> Path:
        """Directory of the checkpoint taken after optimizer step ``step``."""
        return self.directory / f"step={step:07d}"

    def _scan(self) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
        """``(valid as (path, meta), damaged as (path, problem))``, each ordered by step (oldest first).

        Temporaries (names starting with ``.``) are skipped; so is a directory that is neither named ``step=<N>``
        nor holds a ``meta.json`` (not a checkpoint at all)."""
        valid, damaged = [], []
        if not self.directory.is_dir():
            return valid, damaged
        for path in self.directory.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            if not path.name.startswith("step=") and not (path / "meta.json").is_file():
                continue
            problem = checkpoint_problem(path)
            if problem is None:
                valid.append((path, json.loads((path / "meta.json").read_text())))
            else:
                damaged.append((path, problem))
        valid.sort(key=lambda item: int(item[1]["step"]))
        damaged.sort(key=lambda item: step_of_name(item[0]))
        return valid, damaged

    def checkpoints(self) -> list[tuple[Path, dict]]:
        """Complete (not damaged) checkpoints as ``(path, meta)``, oldest step first."""
        return self._scan()[0]

    def damaged(self) -> list[tuple[Path, str]]:
        """Damaged checkpoint directories as ``(path, problem)`` (see :func:`checkpoint_problem`), by step."""
        return self._scan()[1]

    def latest(self) -> Path | None:
        """The valid checkpoint with the highest step, or None (damaged ones are skipped: see :meth:`damaged`)."""
        found = self.checkpoints()
        return found[-1][0] if found else None

    def _score(self, meta: dict) -> float:
        value = meta.get("metrics", {}).get(self.monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        return float(value) if self.mode == "min" else -float(value)

    def prune(self) -> list[Path]:
        """Delete checkpoints outside the top-k (never the latest) and stale temporaries; return what was removed.
        Damaged checkpoints are left alone."""
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


def step_of_name(path: Path) -> int:
    """``N`` of a ``step=<N>`` directory name (-1 if the name has no number)."""
    try:
        return int(path.name.split("=", 1)[1])
    except (IndexError, ValueError):
        return -1

"""Metric logging (TensorBoard, CSV, optional Weights & Biases) and console output."""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment

from nemo_aligner.errors import MissingDependencyError
from nemo_aligner.utils.fs import atomic_write_text

_LOG = logging.getLogger("nemo_aligner")


class _ProgressAwareHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a log line printed while a progress bar is on screen gets a line of its own
    (the bar is cleared and redrawn below it) instead of being glued to the end of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # never let console output break a run
            self.handleError(record)


def get_logger() -> logging.Logger:
    """The package logger, printing ``[nemo_aligner] message`` lines to stderr once configured."""
    _LOG.disabled = False  # logging.config with disable_existing_loggers (Hydra's) must not silence us
    if not _LOG.handlers:
        handler = _ProgressAwareHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[nemo_aligner] %(message)s"))
        _LOG.addHandler(handler)
        _LOG.setLevel(logging.INFO)
        _LOG.propagate = False
    return _LOG


CSV_METRICS = Path("csv") / "metrics.csv"
"""Where the CSV metrics of a run go, relative to its log directory."""


class _AppendingWriter(_ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued (its header is read back so new
    columns still rewrite the header) instead of deleted, which wiped the history of every resumed run."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(key for key in header if key)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the ``metrics.csv`` of an earlier (killed or finished) run in the same directory.

    Rows that a killed run wrote after its last checkpoint are dropped when the run resumes
    (:func:`trim_csv_log`, called by the training loops), so each step appears once."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self._root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_csv_log(log_dir: str | Path, last_step: int) -> int:
    """Drop the rows of ``<log_dir>/csv/metrics.csv`` whose ``step`` is greater than ``last_step`` (the step of the
    checkpoint a run resumes from; ``-1`` for a fresh run, which removes the file): they were logged by a run killed
    after that checkpoint and are logged again. Rewritten atomically; a missing file is a no-op.

    Returns:
        The number of rows dropped.
    """
    path = Path(log_dir) / CSV_METRICS
    if not path.is_file():
        return 0
    if last_step < 0:
        with open(path, newline="") as f:
            count = sum(1 for _ in csv.DictReader(f))
        path.unlink()
        return count
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)

    def step_of(row: dict) -> float:
        try:
            return float(row.get("step") or "nan")
        except ValueError:
            return float("nan")

    kept = [row for row in rows if step_of(row) <= last_step]  # NaN (no step) compares False: dropped
    if len(kept) == len(rows):
        return 0
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, out.getvalue())
    return len(rows) - len(kept)


def build_loggers(log_dir: str | Path, exp_cfg: Any) -> list:
    """TensorBoard and CSV loggers writing under ``log_dir`` (plus W&B when ``create_wandb_logger`` is true).

    The CSV logger (:class:`AppendingCSVLogger`) continues ``csv/metrics.csv`` across resumes.

    Raises:
        MissingDependencyError: W&B requested but ``wandb`` is not installed (the message names
            ``exp_manager.create_wandb_logger`` and ``pip install wandb``).
    """
    log_dir = Path(log_dir)
    loggers = [
        TensorBoardLogger(root_dir=str(log_dir), name="tensorboard", version=""),
        AppendingCSVLogger(root_dir=str(log_dir), name="csv", version="", flush_logs_every_n_steps=1),
    ]
    if exp_cfg.get("create_wandb_logger", False):
        if importlib.util.find_spec("wandb") is None:  # lightning's WandbLogger would raise ModuleNotFoundError
            raise MissingDependencyError("exp_manager.create_wandb_logger=true needs wandb, which is not installed: "
                                         "`pip install wandb`, or set exp_manager.create_wandb_logger=false")
        from lightning.pytorch.loggers import WandbLogger

        kwargs = dict(exp_cfg.get("wandb_logger_kwargs", {}) or {})
        loggers.append(WandbLogger(save_dir=str(log_dir), **kwargs))
    return loggers


def table_sink(loggers: Sequence[Any]):
    """A ``(key, columns, rows, step) -> None`` sink that hands a sample table to every logger that takes tables
    (a Lightning ``WandbLogger``'s ``log_table``: a ``wandb.Table`` under ``key``); loggers without tables (TensorBoard,
    CSV) are skipped, so without W&B it does nothing.

    Args:
        loggers: Fabric's loggers (:func:`build_loggers`).
    """
    takers = [logger for logger in loggers if callable(getattr(logger, "log_table", None))]

    def log_table(key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        for logger in takers:
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=step)

    return log_table


def format_metrics(metrics: dict[str, float], keys: list[str] | None = None) -> str:
    """``key=value`` pairs with 4 significant digits, in ``keys`` order when given."""
    keys = keys or list(metrics)
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)

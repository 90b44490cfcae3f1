"""Metric logging (TensorBoard, CSV, optional Weights & Biases) and console output."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

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


def build_loggers(log_dir: str | Path, exp_cfg: Any) -> list:
    """TensorBoard and CSV loggers writing under ``log_dir`` (plus W&B when ``create_wandb_logger`` is true).

    Raises:
        ImportError: W&B requested but ``wandb`` is not installed (``pip install nemo_aligner[wandb]``).
    """
    log_dir = Path(log_dir)
    loggers = [
        TensorBoardLogger(root_dir=str(log_dir), name="tensorboard", version=""),
        CSVLogger(root_dir=str(log_dir), name="csv", version="", flush_logs_every_n_steps=1),
    ]
    if exp_cfg.get("create_wandb_logger", False):
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError as err:  # pragma: no cover - optional dependency
            raise ImportError("exp_manager.create_wandb_logger=true needs `pip install wandb`") from err
        kwargs = dict(exp_cfg.get("wandb_logger_kwargs", {}) or {})
        loggers.append(WandbLogger(save_dir=str(log_dir), **kwargs))
    return loggers


def format_metrics(metrics: dict[str, float], keys: list[str] | None = None) -> str:
    """``key=value`` pairs with 4 significant digits, in ``keys`` order when given."""
    keys = keys or list(metrics)
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)

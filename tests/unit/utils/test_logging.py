"""The sample-table sink: tables go to every logger that takes them (W&B), and nowhere else; W&B without its package."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
from lightning.pytorch.loggers import WandbLogger

from nemo_aligner.errors import MissingDependencyError
from nemo_aligner.utils.logging import build_loggers, table_sink


class TableLogger:
    def __init__(self):
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


def test_table_sink_reaches_table_loggers_only(tmp_path):
    taker = TableLogger()
    loggers = build_loggers(tmp_path, {}) + [taker]  # TensorBoard and CSV take no tables
    sink = table_sink(loggers)
    sink("val/pairs", ("prompt", "score"), [("hi", 1.5), ("yo", 2.0)], 7)
    assert taker.tables == [("val/pairs", ["prompt", "score"], [["hi", 1.5], ["yo", 2.0]], 7)]


def test_table_sink_calls_wandb_logger_log_table_with_its_keywords():
    # the keywords the sink passes exist on Lightning's WandbLogger.log_table (checked without wandb installed)
    params = inspect.signature(WandbLogger.log_table).parameters
    assert {"key", "columns", "data", "step"} <= set(params)


def test_table_sink_without_table_loggers_does_nothing(tmp_path):
    table_sink(build_loggers(tmp_path, {}))("val/samples", ["a"], [[1]], 0)  # no error, nothing written
    assert not list(tmp_path.rglob("*table*"))


def test_wandb_without_the_package_is_one_line_naming_the_key(tmp_path, monkeypatch):
    """build_loggers is also reached without the config checks (e.g. a Ray Train worker); lightning's WandbLogger
    raised ``ModuleNotFoundError: Requirement 'wandb>=0.12.10' not met`` there."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(MissingDependencyError) as err:
        build_loggers(tmp_path, {"create_wandb_logger": True})
    assert str(err.value) == ("exp_manager.create_wandb_logger=true needs wandb, which is not installed: "
                              "`pip install wandb`, or set exp_manager.create_wandb_logger=false")

"""The sample-table sink: tables go to every logger that takes them (W&B), and nowhere else."""

from __future__ import annotations

import inspect

from lightning.pytorch.loggers import WandbLogger

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

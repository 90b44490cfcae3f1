"""Curves of one or more runs from their CSV logs: ``python -m nemo_aligner.plot <log_dir> [<log_dir> ...]``.

Reads ``<log_dir>/csv/metrics.csv`` (written by every trainer, see :data:`nemo_aligner.utils.logging.CSV_METRICS`)
and draws one panel per metric family found in any of the runs (loss, accuracy, reward, margin, KL, length, entropy,
learning rate), each against the optimizer step, train (``train/...``, solid) and validation (``val/...``, dashed with
markers) in the same panel, one colour per run. Writes one PNG (``--output``, default ``<first log_dir>/curves.png``)
with matplotlib's non-interactive Agg backend, so it runs on a machine without a display.

    python -m nemo_aligner.plot results/reference/rm --output docs/user-guide/img/reference_rm.png
    python -m nemo_aligner.plot results/dpo_a results/dpo_b --metrics loss acc --output compare.png

Exit status 2 with one ``error: ...`` line when a log directory has no ``csv/metrics.csv`` or no metric to plot.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from nemo_aligner.errors import MissingFileError, UserError
from nemo_aligner.utils.logging import CSV_METRICS

#: Panel name -> the substrings that put a metric (its name without the ``train/`` / ``val/`` prefix) in the panel,
#: matched in this order (the first match wins); metrics matching none are left out unless ``--metrics`` names them.
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "accuracy": ("acc",),
    "margin": ("margin",),
    "reward": ("reward",),
    "KL (nats)": ("kl",),
    "length (tokens)": ("length", "lengths"),
    "entropy (nats)": ("entropy",),
    "learning rate": ("lr",),
}


def read_metrics(log_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Every numeric column of ``<log_dir>/csv/metrics.csv`` as ``{column: [(step, value), ...]}``, sorted by step;
    empty and non-numeric cells are skipped (each row holds only the metrics logged at that step). ``log_dir`` may
    also be the CSV file itself.

    Raises:
        MissingFileError: no such file.
    """
    path = Path(log_dir)
    if path.is_dir():
        path = path / CSV_METRICS
    if not path.is_file():
        raise MissingFileError(f"{path}: no metrics file (a run's log directory holds csv/metrics.csv)")
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = float(row.get("step") or "nan")
            except ValueError:
                continue
            if math.isnan(step):
                continue
            for key, cell in row.items():
                if key in (None, "step", "epoch") or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    for points in series.values():
        points.sort()
    return series


def panel_of(metric: str, wanted: list[str] | None = None) -> str | None:
    """The panel a column goes to: with ``wanted`` (metric names without prefix), the metric's own name if it is
    wanted, else None; otherwise the first :data:`PANELS` entry whose substrings occur in the name, else None.
    ``time_*`` columns (seconds) are never plotted by default."""
    name = metric.split("/", 1)[-1]
    if wanted is not None:
        return name if name in wanted else None
    if name.startswith("time") or name.endswith("_per_GBS"):
        return None
    for panel, needles in PANELS.items():
        if any(needle in name.lower() for needle in needles):
            return panel
    return None


def plot_runs(log_dirs: list[str | Path], output: str | Path, metrics: list[str] | None = None,
              labels: list[str] | None = None, title: str | None = None) -> list[str]:
    """Draw the runs' curves into one PNG at ``output`` (parent directories are created).

    Args:
        log_dirs: run log directories (or ``metrics.csv`` files).
        output: the PNG path.
        metrics: plot exactly these metric names (without ``train/``/``val/``), one panel each; None: every
            column that :func:`panel_of` places.
        labels: one legend label per run (default: each directory's name).
        title: the figure title.

    Returns:
        The panel names drawn, in order.

    Raises:
        MissingFileError: a run without ``csv/metrics.csv``.
        UserError: nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(d) for d in log_dirs]
    labels = labels or [Path(d).name if Path(d).is_dir() else Path(d).parent.parent.name for d in log_dirs]
    panels: dict[str, list[tuple[int, str]]] = {}
    for r, series in enumerate(runs):
        for column in sorted(series):
            panel = panel_of(column, metrics)
            if panel is not None:
                panels.setdefault(panel, []).append((r, column))
    if not panels:
        raise UserError(f"nothing to plot in {', '.join(map(str, log_dirs))}"
                        + (f" (no column named {metrics})" if metrics else ""))
    order = [p for p in (metrics or PANELS) if p in panels]
    cols = min(3, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, order):
        for k, (r, column) in enumerate(panels[panel]):
            steps, values = zip(*runs[r][column])
            validation = column.startswith("val")
            colour = colours[(r if len(runs) > 1 else k) % len(colours)]  # one colour per run, or per metric
            ax.plot(steps, values, color=colour, linestyle="--" if validation else "-",
                    marker="o" if validation else None, markersize=3, linewidth=1.2,
                    label=f"{labels[r]}: {column}" if len(runs) > 1 else column)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return order


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, draw, print the PNG's path; an error is one ``error: ...`` line and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m nemo_aligner.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dirs", nargs="+", help="run log directories (each with csv/metrics.csv)")
    parser.add_argument("--output", "-o", default=None, help="PNG path (default: <first log_dir>/curves.png)")
    parser.add_argument("--metrics", nargs="+", default=None, help="only these metrics, e.g. loss acc rewards_mean")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.log_dirs):
        parser.error(f"--labels has {len(args.labels)} entries for {len(args.log_dirs)} runs")
    output = args.output or str(Path(args.log_dirs[0]) / "curves.png")
    try:
        panels = plot_runs(args.log_dirs, output, args.metrics, args.labels, args.title)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {output} ({', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

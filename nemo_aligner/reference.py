"""The ``summary.json`` of a reference run (``scripts/reference/*.sh``): its held-out numbers, its targets and whether
it met them, from the files the run wrote.

    python -m nemo_aligner.reference summary rm  results/reference/rm  --seconds 2400
    python -m nemo_aligner.reference summary dpo results/reference/dpo --seconds 3000
    python -m nemo_aligner.reference summary ppo results/reference/ppo --seconds 3500   # also rs, reinforce
    python -m nemo_aligner.reference summary self_rewarding results/reference/self_rewarding --seconds 3600

What each kind reads (in the run's directory) and its targets (issue "Show that every trainer makes a better model"):

* ``rm``: ``eval_validation.json`` (``eval_reward_model.py --output-json`` of the export on the validation pairs) and
  the ``val/acc`` curve of ``csv/metrics.csv``. Target: validation accuracy >= 0.62.
* ``dpo``: the ``val/acc`` (implicit-reward accuracy) and ``val/reward_margin`` curves (``val/rewards_chosen_mean``
  minus ``val/rewards_rejected_mean`` where the margin is not logged). Targets: the last validation accuracy >= 0.62
  and a margin that grows (last > first).
* ``ppo``, ``rs``, ``reinforce``: ``eval_before.json`` and ``eval_after.json`` (``eval_policy.py --output-json`` of
  the initial policy and of the export, same prompts and settings). Targets: the mean reward of the greedy responses
  rises by >= 0.5 of the reward model's reward standard deviation (1 for a standardised RM export, which is what the
  reference RM is); the KL to the initial policy stays <= 5 nats per response. Distinct-2 and the mean length are
  reported before and after (collapse shows as a drop in distinct-2).
* ``self_rewarding``: ``eval_before.json`` and ``eval_iteration_<i>.json`` (``eval_policy.py --judge self``: the
  reference RM's reward and the policy's own judge score of its greedy responses, after each iteration ``i``). No
  target (a 135M judge is weak): the per-iteration numbers are reported as they are.

Prints the summary as one line and writes it to ``<run>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nemo_aligner.errors import MissingFileError, UserError
from nemo_aligner.plot import read_metrics
from nemo_aligner.utils.fs import atomic_write_text

#: Targets of the reference runs.
RM_MIN_ACC = 0.62
DPO_MIN_ACC = 0.62
ONLINE_MIN_REWARD_GAIN_STD = 0.5
ONLINE_MAX_KL = 5.0
ONLINE_KINDS = ("ppo", "rs", "reinforce")


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"{path}: not found (the reference script writes it before the summary)")
    return json.loads(path.read_text())


def _curve(series: dict, key: str) -> list[list[float]]:
    return [[step, value] for step, value in series.get(key, [])]


def rm_summary(run: Path) -> dict[str, Any]:
    """Reward-model numbers and target (see the module docstring).

    Raises:
        MissingFileError: no ``eval_validation.json`` or ``csv/metrics.csv`` in ``run``.
    """
    ev = _load_json(run / "eval_validation.json")
    series = read_metrics(run)
    return {
        "val_acc": ev["acc"], "val_reward_margin": ev["reward_margin"], "val_loss": ev["loss"],
        "num_validation_pairs": ev["num_examples"],
        "val_acc_curve": _curve(series, "val/acc"),
        "train_steps": int(max((s for s, _ in series.get("train/loss", [])), default=0)),
        "targets": {"val_acc_min": RM_MIN_ACC},
        "met": {"val_acc": ev["acc"] >= RM_MIN_ACC},
    }


def dpo_summary(run: Path) -> dict[str, Any]:
    """DPO numbers and targets (see the module docstring).

    Raises:
        MissingFileError: no ``csv/metrics.csv``; UserError: no ``val/acc`` in it.
    """
    series = read_metrics(run)
    acc = _curve(series, "val/acc")
    margin = _curve(series, "val/reward_margin")
    if not margin and "val/rewards_chosen_mean" in series:
        rejected = dict(series.get("val/rewards_rejected_mean", []))
        margin = [[s, c - rejected[s]] for s, c in series["val/rewards_chosen_mean"] if s in rejected]
    if not acc:
        raise UserError(f"{run}: no val/acc in csv/metrics.csv (the run validated never)")
    return {
        "val_acc": acc[-1][1], "val_acc_first": acc[0][1], "val_acc_curve": acc,
        "val_reward_margin": margin[-1][1] if margin else None,
        "val_reward_margin_first": margin[0][1] if margin else None, "val_reward_margin_curve": margin,
        "train_steps": int(max((s for s, _ in series.get("train/loss", [])), default=0)),
        "targets": {"val_acc_min": DPO_MIN_ACC, "val_reward_margin": "grows (last > first)"},
        "met": {"val_acc": acc[-1][1] >= DPO_MIN_ACC,
                "val_reward_margin_grows": bool(margin) and len(margin) > 1 and margin[-1][1] > margin[0][1]},
    }


def online_summary(run: Path, rm_std: float = 1.0) -> dict[str, Any]:
    """PPO / RS / REINFORCE numbers and targets (see the module docstring); ``rm_std`` is the reward model's reward
    standard deviation in the units its export returns (1 for a standardised export).

    Raises:
        MissingFileError: no ``eval_before.json`` or ``eval_after.json`` in ``run``.
    """
    before, after = _load_json(run / "eval_before.json"), _load_json(run / "eval_after.json")
    gain = after["reward_mean"] - before["reward_mean"]
    keys = ("reward_mean", "reward_std", "kl_mean", "kl_max", "length_mean", "ended_fraction", "distinct_1",
            "distinct_2")
    return {
        "before": {k: before.get(k) for k in keys}, "after": {k: after.get(k) for k in keys},
        "reward_gain": gain, "reward_gain_in_rm_std": gain / rm_std, "num_prompts": after["num_prompts"],
        "targets": {"reward_gain_in_rm_std_min": ONLINE_MIN_REWARD_GAIN_STD, "kl_mean_max": ONLINE_MAX_KL},
        "met": {"reward_gain": gain / rm_std >= ONLINE_MIN_REWARD_GAIN_STD,
                "kl": after.get("kl_mean") is not None and after["kl_mean"] <= ONLINE_MAX_KL},
    }


def self_rewarding_summary(run: Path) -> dict[str, Any]:
    """Self-rewarding numbers per iteration (see the module docstring): for the initial policy (iteration 0) and after
    each iteration, the reference RM's reward, the judge score (the policy judging its own greedy responses), the KL
    to the initial policy, the length, the ended fraction and distinct-2.

    Raises:
        MissingFileError: no ``eval_before.json`` or no ``eval_iteration_1.json`` in ``run``.
    """
    files = [run / "eval_before.json"]
    i = 1
    while (run / f"eval_iteration_{i}.json").is_file():
        files.append(run / f"eval_iteration_{i}.json")
        i += 1
    if len(files) == 1:
        raise MissingFileError(f"{run / 'eval_iteration_1.json'}: not found (the reference script writes one per "
                               "iteration before the summary)")
    keys = ("reward_mean", "reward_std", "judge_score_mean", "judge_score_std", "kl_mean", "kl_max", "length_mean",
            "ended_fraction", "distinct_2")
    rows = [{"iteration": k, **{key: ev.get(key) for key in keys}} for k, ev in enumerate(map(_load_json, files))]
    return {"iterations": rows, "reward_gain": rows[-1]["reward_mean"] - rows[0]["reward_mean"],
            "num_prompts": _load_json(files[-1])["num_prompts"], "targets": {}, "met": {}}


def write_summary(kind: str, run: str | Path, seconds: float | None = None, extra: dict | None = None) -> dict:
    """Build ``kind``'s summary of the run in ``run``, add ``seconds`` (the run's wall time) and ``extra``, write it to
    ``<run>/summary.json`` and return it.

    Raises:
        MissingFileError: a file the summary needs is missing.
        UserError: an unknown ``kind``, or a run without validation metrics.
    """
    run = Path(run)
    if kind == "rm":
        summary = rm_summary(run)
    elif kind == "dpo":
        summary = dpo_summary(run)
    elif kind in ONLINE_KINDS:
        summary = online_summary(run)
    elif kind == "self_rewarding":
        summary = self_rewarding_summary(run)
    else:
        raise UserError(f"unknown reference run kind {kind!r}: use rm, dpo, {', '.join(ONLINE_KINDS)}, "
                        "self_rewarding")
    summary = {"trainer": kind, "run": str(run), **summary, "wall_seconds": seconds, **(extra or {})}
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``summary KIND RUN [--seconds N]``: print and write the summary; an error is one line and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m nemo_aligner.reference", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="write <run>/summary.json")
    p.add_argument("kind", choices=["rm", "dpo", *ONLINE_KINDS, "self_rewarding"])
    p.add_argument("run", help="the reference run's directory")
    p.add_argument("--seconds", type=float, default=None, help="the run's wall time")
    args = parser.parse_args(argv)
    try:
        summary = write_summary(args.kind, args.run, args.seconds)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in summary.items() if not k.endswith("_curve")}
    print(json.dumps(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())

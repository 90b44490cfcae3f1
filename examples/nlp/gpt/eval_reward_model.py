"""Accuracy and mean reward margin of a reward model on a preference / ranking file.

    python examples/nlp/gpt/eval_reward_model.py results/rm/hf_export ../shared/data/hh-rlhf/validation.jsonl.gz
    python examples/nlp/gpt/eval_reward_model.py results/rm/checkpoints/step=0000100 data.jsonl --max-seq-length 512

``MODEL`` is an RM export (a directory with ``config.json``, e.g. ``<run>/hf_export``) or a training checkpoint
(a directory with ``state.pt``; the model is rebuilt from ``<run>/config.yaml`` written by
``train_reward_model.py``). ``DATA`` is any file ``nemo_aligner.data.reward`` reads (all DPO formats, HH-RLHF,
NeMo-RLHF ``{"text"}`` pairs, ranked lists). Prints one summary line, e.g.
``acc=0.6500 reward_margin=0.4210 rewards_chosen_mean=... loss=... num_examples=200 num_comparisons=200``.
``--output-json F`` also writes the summary (and the model and data paths) to ``F``.
Exit status 2 with an ``error: ...`` line for a missing file or a malformed data line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nemo_aligner.algorithms.reward_model import reward_loss_and_metrics
from nemo_aligner.data.reward import load_reward_datasets
from nemo_aligner.data.reward_batch import collate_reward_examples
from nemo_aligner.errors import MissingFileError
from nemo_aligner.models.reward_model import RewardScorer
from nemo_aligner.recipes.common import run_or_exit
from nemo_aligner.utils.fs import atomic_write_text

RUN_CONFIG = "config.yaml"


def load_scorer(path: str | Path, device: str = "cpu") -> RewardScorer:
    """A :class:`RewardScorer` for an RM export directory or a ``train_reward_model.py`` checkpoint directory.

    Raises:
        FileNotFoundError: neither ``config.json`` nor ``state.pt`` in ``path``, or a checkpoint without its run's
            ``config.yaml`` two levels up.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return RewardScorer.from_pretrained(str(path), device=device)
    if not (path / "state.pt").is_file():
        raise MissingFileError(f"{path} is neither a reward-model export (config.json) nor a checkpoint (state.pt)")
    run_cfg = path.parent.parent / RUN_CONFIG
    if not run_cfg.is_file():
        raise MissingFileError(f"checkpoint {path}: its run config {run_cfg} is missing")
    from lightning.fabric import Fabric
    from omegaconf import OmegaConf

    from nemo_aligner.models.reward_model import HFRewardModel

    cfg = OmegaConf.load(run_cfg)
    fabric = Fabric(accelerator="cpu" if device == "cpu" else "auto", devices=1)
    max_len = int(cfg.model.encoder_seq_length)
    model = HFRewardModel(fabric, cfg.model, str(cfg.pretrained_checkpoint.restore_from_path), max_steps=1, max_seq_length=max_len)
    model.load_checkpoint(str(path))
    return model.as_scorer(device=device)


def evaluate(scorer: RewardScorer, dataset, micro_batch_size: int = 8) -> dict[str, float]:
    """Metrics of :func:`~nemo_aligner.algorithms.reward_model.reward_loss_and_metrics` (standardised rewards)
    averaged over the examples of ``dataset`` (rows of :func:`~nemo_aligner.data.reward.build_reward_dataset`)."""
    sums: dict[str, float] = {}
    comparisons = 0
    for start in range(0, len(dataset), micro_batch_size):
        rows = [dataset[i] for i in range(start, min(start + micro_batch_size, len(dataset)))]
        batch = collate_reward_examples(rows, int(scorer.tokenizer.pad_token_id))
        seqs = [list(r["prompt_ids"]) + list(resp) for r in rows for resp in r["response_ids"]]
        rewards = torch.tensor(scorer.score(seqs, micro_batch_size=len(seqs)))
        _, metrics = reward_loss_and_metrics(rewards, batch)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(rows)
        comparisons += int(((batch.group[:, None] == batch.group[None, :]) & (batch.preferences[:, None] > batch.preferences[None, :])).sum())
    out = {k: v / len(dataset) for k, v in sums.items()}
    out.update(num_examples=len(dataset), num_comparisons=comparisons)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv``, evaluate, print the summary line and return it as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="RM export directory or training checkpoint directory")
    parser.add_argument("data", nargs="+", help="preference / ranking JSON-lines file(s)")
    parser.add_argument("--max-seq-length", type=int, default=None, help="default: the model's stored limit")
    parser.add_argument("--truncation", default="truncate", choices=["truncate", "drop"])
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-json", default=None, help="also write the summary to this JSON file")
    args = parser.parse_args(argv)

    scorer = load_scorer(args.model, args.device)
    max_len = args.max_seq_length or scorer.max_seq_length or 4096
    if scorer.max_seq_length:
        max_len = min(max_len, scorer.max_seq_length)
    dataset, _ = load_reward_datasets(args.data, scorer.tokenizer, max_len, args.truncation, args.cache_dir)
    summary = evaluate(scorer, dataset, args.micro_batch_size)
    keys = ["acc", "reward_margin", "rewards_chosen_mean", "rewards_rejected_mean", "loss"]
    print(" ".join(f"{k}={summary[k]:.4f}" for k in keys) + f" num_examples={summary['num_examples']} num_comparisons={summary['num_comparisons']}")
    if args.output_json:
        atomic_write_text(args.output_json, json.dumps({"model": str(args.model), "data": list(args.data), **summary},
                                                       indent=2) + "\n")
    return summary


if __name__ == "__main__":
    run_or_exit(main)

"""The PPO recipe on tiny models: a prompt file, the composed ``gpt_ppo_actor`` config, the overrides of a run
that learns in a few steps, and what a kill-and-resume test needs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers.config import compose_config

TOPICS = ["bread", "tea", "rain", "maps", "owls", "jazz", "kites", "salt", "fox", "dog", "salt", "yeast"]


def write_prompts(path: Path, n: int = 16) -> Path:
    """A JSONL prompt file of ``n`` plain-text prompts, ``{"prompt": "Human: Tell me about <topic> <i>. Assistant:"}``
    (``i`` = 0 .. n - 1, so no two prompts are the same text)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Human: Tell me about {TOPICS[i % len(TOPICS)]} {i}. Assistant:"}) + "\n")
    return path


def ppo_cfg(tmp_path, model_dir, prompts, *overrides, run="run"):
    """``conf/gpt_ppo_actor.yaml`` composed for a tiny colocated run on CPU: policy and critic from ``model_dir``, no
    reward model (pass ``reward_fn``), ``prompts`` for training and validation, logs in ``tmp_path / run``; 8
    rollouts of at most 8 tokens per step, global batch 8, micro-batch 4; ``overrides`` come last and win."""
    return compose_config("gpt_ppo_actor", [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"critic.restore_from_path={model_dir}",
        "reward_model.restore_from_path=null",
        f"model.data.data_prefix.train=[{prompts}]",
        f"model.data.data_prefix.validation=[{prompts}]",
        f"exp_manager.explicit_log_dir={tmp_path / run}",
        "trainer.accelerator=cpu",
        "model.encoder_seq_length=64",
        "model.ppo.length_params.max_length=8",
        "model.ppo.num_rollout_samples=8",
        "model.ppo.rollout_micro_batch_size=4",
        "model.ppo.num_val_samples=8",
        "model.global_batch_size=8",
        "model.micro_batch_size=4",
        *overrides,
    ])


LEARNING_OVERRIDES = [
    "trainer.ppo.max_epochs=100", "trainer.ppo.ppo_epochs=2", "trainer.ppo.gae_lambda=1.0",
    "trainer.ppo.val_check_interval=0", "model.ppo.num_rollout_samples=16", "model.ppo.length_params.max_length=4",
    "model.optim.lr=1e-2", "model.optim.sched.min_lr=1e-2", "critic.optim.lr=1e-3",
    # the random tiny policy almost never emits EOS within 4 tokens: train on truncated responses too
    "model.ppo.mask_truncated=false",
]


class Killed(Exception):
    """Stands in for a SIGKILL right after a checkpoint."""


def checkpoint_model_state(path: Path) -> dict:
    """The model weights of the checkpoint in ``path`` (``path/state.pt``)."""
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)["model"]


def ppo_command(tmp_path, model_dir, prompts, run, *overrides) -> list[str]:
    """The PPO actor script as a subprocess command (2 Fabric ranks need their own processes): 8 rollouts of at
    most 4 tokens per step, 2 steps, a checkpoint every step, logs in ``tmp_path / run``; ``overrides`` last."""
    import sys

    from tests.helpers.paths import REPO

    return [sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_ppo_actor.py"),
            f"pretrained_checkpoint.restore_from_path={model_dir}", f"model.data.data_prefix.train=[{prompts}]",
            f"model.data.data_prefix.validation=[{prompts}]", f"exp_manager.explicit_log_dir={tmp_path / run}",
            "trainer.accelerator=cpu", "model.encoder_seq_length=64", "model.ppo.length_params.max_length=4",
            "model.ppo.num_rollout_samples=8", "model.ppo.rollout_micro_batch_size=4", "trainer.ppo.max_steps=2",
            "trainer.ppo.save_interval=1", "trainer.ppo.val_check_interval=0", "model.optim.lr=1e-3",
            "critic.optim.lr=1e-3", "exp_manager.export_hf=false", *overrides]


def run_ppo_ranks(cmd: list[str], ranks: int):
    """Run ``cmd`` (:func:`ppo_command`) as ``ranks`` Fabric DDP ranks (``trainer.devices=ranks
    trainer.strategy=ddp`` when > 1) and check that it succeeded on that many ranks; the finished process."""
    import os
    import subprocess

    extra = [f"trainer.devices={ranks}", "trainer.strategy=ddp"] if ranks > 1 else []
    proc = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if ranks > 1:
        assert f"{ranks} rank(s)" in proc.stderr
    return proc


def csv_column(run_dir, key: str) -> list[float]:
    """The logged values of ``key`` (e.g. ``train/value_loss``) in ``run_dir/csv/metrics.csv``, in step order."""
    import csv

    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]

"""Learning-rate schedules."""

from __future__ import annotations

import math

import torch

from nemo_aligner.utils.config import ConfigValueError


def cosine_annealing_lambda(max_steps: int, warmup_steps: int = 0, constant_steps: int = 0, min_lr_ratio: float = 0.0):
    """Multiplier of the peak LR at optimizer step ``s`` (NeMo's ``CosineAnnealing`` schedule).

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``, then half-cosine decay to
    ``min_lr`` over ``max_steps - warmup_steps - constant_steps`` steps, then ``min_lr`` for the last
    ``constant_steps`` (Loshchilov & Hutter 2017, SGDR, eq. 5, without restarts).

    Args:
        max_steps: total optimizer steps of the run (>= 1).
        warmup_steps, constant_steps: step counts (>= 0).
        min_lr_ratio: ``min_lr / lr`` in ``[0, 1]``.

    Raises:
        ValueError: on negative counts or a ratio outside ``[0, 1]``.
    """
    if max_steps < 1 or warmup_steps < 0 or constant_steps < 0:
        raise ConfigValueError(f"bad schedule: max_steps={max_steps} warmup_steps={warmup_steps} constant_steps={constant_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigValueError(f"min_lr must be between 0 and lr (min_lr/lr = {min_lr_ratio})")
    decay_steps = max(1, max_steps - warmup_steps - constant_steps)

    def multiplier(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_cosine_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, lr: float, sched_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :func:`cosine_annealing_lambda` from a ``model.optim.sched`` config section."""
    min_lr = float(sched_cfg.get("min_lr", 0.0))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        cosine_annealing_lambda(
            max_steps=max_steps,
            warmup_steps=int(sched_cfg.get("warmup_steps", 0)),
            constant_steps=int(sched_cfg.get("constant_steps", 0)),
            min_lr_ratio=min_lr / lr if lr > 0 else 0.0,
        ),
    )

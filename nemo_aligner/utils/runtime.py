"""Runtime: lightning Fabric from the ``trainer`` config section (devices, precision, strategy, seeding)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric import Fabric

_PRECISION_ALIASES = {
    "32": "32-true",
    "32-true": "32-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "16-true": "16-true",
}


def normalize_precision(value: Any) -> str:
    """Map NeMo/Lightning precision spellings (``32``, ``bf16``, ``bf16-mixed``, ``16`` ...) to Fabric's.

    Raises:
        ValueError: an unknown spelling.
    """
    key = str(value).strip().lower()
    if key not in _PRECISION_ALIASES:
        raise ValueError(f"trainer.precision={value!r}: use one of {sorted(set(_PRECISION_ALIASES))}")
    return _PRECISION_ALIASES[key]


def build_fabric(trainer_cfg: Any, loggers: list | None = None, seed: int = 1234) -> Fabric:
    """Create, launch and seed a Fabric from ``trainer.{accelerator,devices,num_nodes,precision,strategy}``.

    ``accelerator=auto`` picks a GPU when one is visible and the CPU otherwise, so one config runs on a laptop and
    on a cluster (multi-node through torchrun or SLURM, which Fabric detects). ``strategy=fsdp`` shards every
    transformer block. On CPU, ``16-mixed`` is replaced by ``bf16-mixed`` (CPU autocast has no float16).

    Raises:
        ValueError: unknown precision or strategy.
    """
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", 1)
    precision = normalize_precision(trainer_cfg.get("precision", "32"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision == "16-mixed":
        precision = "bf16-mixed"
    strategy: Any = str(trainer_cfg.get("strategy", "auto"))
    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        from nemo_aligner.models.hf_causal_lm import _auto_wrap_policy

        strategy = FSDPStrategy(auto_wrap_policy=_auto_wrap_policy, state_dict_type="sharded")
    elif strategy not in ("auto", "ddp", "ddp_spawn", "dp", "single_device", "ddp_find_unused_parameters_true"):
        raise ValueError(f"trainer.strategy={strategy!r}: use auto, ddp or fsdp")
    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=int(trainer_cfg.get("num_nodes", 1)),
        strategy=strategy,
        precision=precision,
        loggers=loggers,
    )
    fabric.launch()
    fabric.seed_everything(seed, workers=True, verbose=False)
    return fabric

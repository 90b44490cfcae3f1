"""Runtime: lightning Fabric from the ``trainer`` config section (devices, precision, strategy, seeding).

The precision spellings are normalised by :func:`nemo_aligner.utils.config.normalize_precision` (re-exported here),
so that the config checks validate them without importing torch or lightning.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from torch import nn

from nemo_aligner.utils.config import ConfigValueError, check_accelerator, normalize_precision  # noqa: F401 (normalize_precision: re-exported)


def transformer_block_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy (``torch.distributed.fsdp``'s ``auto_wrap_policy`` signature): one FSDP unit per
    transformer block, recognised by its class name (a Hugging Face ``*DecoderLayer``, GPT-2's ``GPT2Block``, or a
    ``Block``); every other module is sharded with the block or the root that holds it."""
    if recurse:
        return True
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name in {"GPT2Block", "Block"}


def build_fabric(trainer_cfg: Any, loggers: list | None = None, seed: int = 1234, cluster_environment: Any = None) -> Fabric:
    """Create, launch and seed a Fabric from ``trainer.{accelerator,devices,num_nodes,precision,strategy}``.

    ``accelerator=auto`` picks a GPU when one is visible and the CPU otherwise, so one config runs on a laptop and
    on a cluster (multi-node through torchrun or SLURM, which Fabric detects). ``strategy=fsdp`` shards every
    transformer block (:func:`transformer_block_wrap_policy`). On CPU, ``16-mixed`` is replaced by ``bf16-mixed``
    (CPU autocast has no float16).

    ``cluster_environment`` (a lightning ``ClusterEnvironment`` whose processes were started and joined into a
    ``torch.distributed`` group by someone else, e.g. Ray Train's workers): the DDP (``auto``/``ddp``) or FSDP
    strategy uses it, so Fabric attaches to that process group instead of creating one; ``trainer_cfg.devices`` and
    ``num_nodes`` must then describe that group (processes per node, nodes).

    Raises:
        ConfigValueError: unknown precision or strategy; an accelerator this machine does not have (``gpu``/``cuda``
            without a visible CUDA device, ``mps`` without an MPS device).
        MissingDependencyError: ``tpu`` without ``torch_xla`` (:func:`~nemo_aligner.utils.config.check_accelerator`).
    """
    accelerator = str(check_accelerator(trainer_cfg.get("accelerator", "auto"))).strip().lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigValueError(f"trainer.accelerator={accelerator} but no CUDA device is visible on this machine; set "
                               "trainer.accelerator=auto or cpu")
    devices = trainer_cfg.get("devices", 1)
    precision = normalize_precision(trainer_cfg.get("precision", "32"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision == "16-mixed":
        precision = "bf16-mixed"
    strategy: Any = str(trainer_cfg.get("strategy", "auto"))
    if strategy == "fsdp":
        strategy = FSDPStrategy(auto_wrap_policy=transformer_block_wrap_policy, state_dict_type="sharded",
                                cluster_environment=cluster_environment)
    elif cluster_environment is not None and strategy in ("auto", "ddp"):
        strategy = DDPStrategy(cluster_environment=cluster_environment)
    elif cluster_environment is not None:
        raise ConfigValueError(f"trainer.strategy={strategy!r} cannot join an existing process group: use auto, ddp or fsdp")
    elif strategy not in ("auto", "ddp", "ddp_spawn", "dp", "single_device", "ddp_find_unused_parameters_true"):
        raise ConfigValueError(f"trainer.strategy={strategy!r}: use auto, ddp or fsdp")
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


def rng_state() -> dict:
    """The global RNG states: ``{"torch": CPU generator state, "python": random.getstate(), "numpy": NumPy's state
    as plain Python values, "cuda": every CUDA device's state or None}``.

    The NumPy state is ``(name, keys as a list of ints, pos, has_gauss, cached_gaussian)`` so that a checkpoint
    holding this dict loads with ``torch.load(weights_only=True)``; :func:`set_rng_state` restores it exactly.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA states only where CUDA is available and ``state`` has
    them)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

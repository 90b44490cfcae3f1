"""Setup steps shared by the training recipes in ``examples/nlp/gpt`` (SFT, DPO, reward model).

Each recipe reads top to bottom as config -> data -> model -> trainer -> fit -> export, calling these small
functions in order::

    check_config(cfg, "gpt_dpo")
    log_dir, checkpoints = checkpoint_manager(cfg.exp_manager)
    fabric = setup_fabric(cfg, log_dir)
    source, tokenizer = load_pretrained(fabric, cfg.pretrained_checkpoint.restore_from_path)
    train_ds, train_stats = load_split(fabric, load_preference_datasets, train_paths, tokenizer=tokenizer, ...)
    trainer_cfg, max_steps = trainer_config(cfg.trainer.dpo, cfg.model, len(train_ds))
    ...
    trainer = DPOTrainer(model, train_ds, val_ds, collate, trainer_cfg, run_context(fabric, cfg.exp_manager,
                         log_dir, checkpoints), loss_cfg=...)
    finish(fabric, checkpoints)

and wrap ``run`` with :func:`run_or_exit` in the Hydra ``main``. Every function that logs does so on rank 0 only.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from nemo_aligner.algorithms.base import RunContext, TrainerConfig, compute_max_steps
from nemo_aligner.errors import OutputExistsError, UserError
from nemo_aligner.generation import VLLMConfig, require_vllm
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.recipes import ray_train
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.config import ConfigValueError, check_batch_sizes, check_keys, check_values, load_schema
from nemo_aligner.utils.logging import build_loggers, get_logger, table_sink
from nemo_aligner.utils.runtime import build_fabric


def check_config(cfg: DictConfig, schema: str) -> None:
    """Reject keys that ``conf/<schema>.yaml`` does not define, then check (and normalise in place) every value
    (:func:`~nemo_aligner.utils.config.check_values`). The first step of every recipe: a bad config fails here, in
    milliseconds, before any data or model loads.

    Raises:
        ConfigKeyError: naming the unknown key (source ``"<schema> config"``).
        ConfigValueError: naming the key of the first bad value and what it should be.
    """
    reference = load_schema(schema)
    check_keys(cfg, reference, source=f"{schema} config")
    check_values(cfg, reference, schema)


def check_writable_dir(path: Path, key: str) -> None:
    """Create ``path`` (with parents) and check that a file can be written in it, so that an unusable log
    directory fails before any data or model loads instead of at the first logged metric.

    Raises:
        ConfigValueError: naming ``key``, the path and the OS error.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = f"{type(err).__name__}: {err.strerror or err}"
        raise ConfigValueError(f"{key}={str(path)!r} is not a writable directory ({reason})") from None


def checkpoint_manager(exp: DictConfig) -> tuple[Path, CheckpointManager]:
    """The run's log directory (``exp_manager.explicit_log_dir``) and the :class:`CheckpointManager` of its
    ``checkpoints/`` subdirectory, set up from ``exp_manager.checkpoint_callback_params``.

    Raises:
        OutputExistsError: the directory already holds checkpoints and ``exp_manager.resume_if_exists`` is false.
        ConfigValueError: the directory cannot be created or written (:func:`check_writable_dir`).
    """
    log_dir = Path(exp.explicit_log_dir)
    check_writable_dir(log_dir, "exp_manager.explicit_log_dir")
    params = exp.checkpoint_callback_params
    checkpoints = CheckpointManager(log_dir / "checkpoints", params.save_top_k, params.monitor, params.get("mode", "min"))
    if not exp.resume_if_exists and checkpoints.latest() is not None:
        raise OutputExistsError(
            f"{log_dir} already holds checkpoints; set exp_manager.resume_if_exists=true to continue that run "
            "or point exp_manager.explicit_log_dir somewhere else"
        )
    return log_dir, checkpoints


def setup_fabric(cfg: DictConfig, log_dir: Path, schema: str | None = None):
    """A launched Fabric for ``cfg.trainer``, logging to ``log_dir`` as ``cfg.exp_manager`` says, seeded with
    ``cfg.model.seed``. With ``schema`` (the recipe's config name), the batch sizes are checked against the real
    data-parallel size (:func:`~nemo_aligner.utils.config.check_batch_sizes`) before anything loads.

    In a Ray Train worker (``trainer.ray.enable``, :mod:`nemo_aligner.recipes.ray_train`) Fabric joins the process
    group Ray Train formed: ``trainer.devices`` / ``num_nodes`` become the workers per node and the number of nodes.

    Raises:
        ConfigValueError: the global batch size is not a multiple of micro-batch size x data-parallel size.
    """
    trainer_cfg, env = cfg.trainer, ray_train.worker_cluster_environment()
    if env is not None:
        trainer_cfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
        trainer_cfg.devices = env.local_world_size()
        trainer_cfg.num_nodes = max(env.world_size() // env.local_world_size(), 1)
    fabric = build_fabric(trainer_cfg, loggers=build_loggers(log_dir, cfg.exp_manager), seed=int(cfg.model.seed),
                          cluster_environment=env)
    if schema is not None:
        check_batch_sizes(cfg, schema, fabric.world_size)
    return fabric


def load_pretrained(fabric, restore_from_path: Any) -> tuple[str, Any]:
    """Resolve the pretrained model (rank 0 first: it may download or convert it), then on every rank return
    ``(local_model_dir, tokenizer)``."""
    if fabric.is_global_zero:
        resolve_pretrained(restore_from_path)
    fabric.barrier()
    source = resolve_pretrained(restore_from_path)
    return source, AutoTokenizer.from_pretrained(source)


def load_split(fabric, load_datasets: Callable, paths: Sequence, *args: Any, **kwargs: Any) -> tuple[Any, list]:
    """``load_datasets(paths, *args, **kwargs)`` on every rank, rank 0 first so that it alone tokenises the files
    into the on-disk cache and the other ranks only memory-map the result.

    Returns:
        ``load_datasets``' ``(dataset, per-file stats)``, or ``(None, [])`` when ``paths`` is empty.
    """
    if not paths:
        return None, []
    if fabric.is_global_zero:
        load_datasets(paths, *args, **kwargs)
    fabric.barrier()
    return load_datasets(paths, *args, **kwargs)


def log_data_stats(fabric, all_stats: list[dict], counts: str) -> None:
    """Log one line per training file: ``train data <path>: <counts>``, where ``counts`` is a format string
    filled from that file's stats dict (e.g. ``"{num_pairs} pairs ({num_truncated} truncated, ...)"``)."""
    if not fabric.is_global_zero:
        return
    for stats in all_stats:
        get_logger().info(f"train data {os.path.normpath(stats['path'])}: {counts.format(**stats)}")


def trainer_config(algorithm_cfg: DictConfig, batch_cfg: DictConfig, num_examples: int) -> tuple[TrainerConfig, int]:
    """:meth:`TrainerConfig.from_cfg` of ``trainer.<algorithm>`` and the batch settings, and the run's number of
    optimizer steps for ``num_examples`` training examples (:func:`compute_max_steps`).

    Raises:
        ConfigValueError: too few examples for one global batch, or ``max_steps=0``.
    """
    trainer_cfg = TrainerConfig.from_cfg(algorithm_cfg, batch_cfg)
    return trainer_cfg, compute_max_steps(num_examples, trainer_cfg)


def log_model_summary(
    fabric,
    model,
    name: str,
    mode: str,
    max_steps: int,
    trainer_cfg: TrainerConfig,
    unit: str,
    log_dir: Path,
    batch_note: str = "",
) -> None:
    """Log (rank 0) the trainable-parameter count and the run's shape, e.g.::

        policy /models/x: 1,234 of 5,678 parameters trainable (LoRA)
        20 steps of 8 pairs (1 rank(s), micro-batch 2); logs and checkpoints in results/dpo

    Args:
        name: what the model is (``"policy <dir>"``); mode: the parenthesised note (``"LoRA"``, ``"full"``, ...);
        unit: what a global batch counts (``"pairs"``); batch_note: appended after the micro-batch size.
    """
    if not fabric.is_global_zero:
        return
    trainable, total = model.num_trainable_parameters()
    log = get_logger()
    log.info(f"{name}: {trainable:,} of {total:,} parameters trainable ({mode})")
    log.info(
        f"{max_steps} steps of {trainer_cfg.global_batch_size} {unit} ({model.data_parallel_size} rank(s), "
        f"micro-batch {trainer_cfg.micro_batch_size}{batch_note}); logs and checkpoints in {log_dir}"
    )


def run_context(fabric, exp: DictConfig, log_dir: Path, checkpoints: CheckpointManager,
                export_hf: bool | None = None) -> RunContext:
    """The :class:`~nemo_aligner.algorithms.base.RunContext` a trainer receives: the log directory and checkpoints
    of :func:`checkpoint_manager`, Fabric's metrics sink (``fabric.log_dict``), the sample-table sink of its loggers
    (:func:`~nemo_aligner.utils.logging.table_sink`: W&B tables when W&B is on) and rank,
    ``exp_manager.resume_if_exists`` and ``exp_manager.export_hf`` (default true; ``export_hf`` given here
    overrides it, e.g. ``False`` for a recipe that exports by itself after training)."""
    return RunContext(
        log_dir=log_dir,
        checkpoints=checkpoints,
        log_metrics=fabric.log_dict,
        log_table=table_sink(fabric.loggers),
        resume=bool(exp.resume_if_exists),
        export_hf=bool(exp.get("export_hf", True)) if export_hf is None else bool(export_hf),
        is_global_zero=fabric.is_global_zero,
    )


def finish(fabric, checkpoints: CheckpointManager) -> None:
    """Finalize the loggers and log (rank 0) the last checkpoint and the best one by the monitored metric."""
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.is_global_zero:
        get_logger().info(
            f"done: last checkpoint {checkpoints.latest()}, best by {checkpoints.monitor}: {checkpoints.best()}"
        )


def use_rollout_engine(policy, section: Any, key: str, log=None, engine: Any = None) -> VLLMConfig:
    """Give ``policy`` (an :class:`~nemo_aligner.models.hf_causal_lm.HFCausalLM`) a vLLM engine when the config
    block ``section`` (``trainer.<algo>.vllm``, named ``key`` in errors) has ``enable=true``; otherwise it keeps
    the native engine. Returns the parsed block. ``engine``: an engine started elsewhere (e.g. the rollout Ray
    actor's :class:`~nemo_aligner.recipes.ray_ppo.RayRolloutEngine`) instead of one in this process.

    Raises:
        MissingDependencyError: ``enable=true`` but vLLM is not installed (the message says how to install it).
        ConfigValueError: a bad value in the block.
    """
    vllm_cfg = VLLMConfig.from_cfg(section, key)
    if vllm_cfg.enable:
        if engine is None:
            require_vllm(f"{key}.enable")
        engine = policy.use_vllm(vllm_cfg, engine=engine)
        if log is not None and policy.data_parallel_rank == 0:
            log.info(f"rollouts: vLLM engine ({key}; start-up took {engine.start_seconds:.1f} s, max_model_len "
                     f"{engine.max_model_len}); the policy's weights are refit into it whenever they change")
    return vllm_cfg


def run_or_exit(fn: Callable, *args: Any) -> Any:
    """Call ``fn(*args)``; on a :class:`~nemo_aligner.errors.UserError` (a user's mistake: a config key or value, a
    data file, a path, a server) print ``error: <message>`` to stderr and exit with status 2 instead of showing a
    traceback. Any other exception is a bug and propagates with its traceback."""
    try:
        return fn(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

"""Reward-model training: a scalar head on a causal LM, Bradley-Terry loss on pairs (all-pairs ranking loss on
ranked lists).

    python examples/nlp/gpt/train_reward_model.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
        "model.data.data_prefix={train: [../shared/data/hh-rlhf/train.jsonl.gz], validation: [../shared/data/hh-rlhf/validation.jsonl.gz]}" \
        trainer.rm.max_steps=20 model.encoder_seq_length=256

Configuration: conf/training_rm.yaml (NeMo-Aligner key names). The export ``<explicit_log_dir>/hf_export`` is an
``AutoModelForSequenceClassification`` (num_labels=1) loadable by plain transformers and by
:class:`nemo_aligner.models.reward_model.RewardScorer`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.base import TrainerConfig, compute_max_steps
from nemo_aligner.algorithms.reward_model import RewardModelTrainer, compute_reward_statistics
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.reward import collate_reward_examples, load_reward_datasets
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.models.reward_model import HFRewardModel
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.config import CONF_DIR, ConfigKeyError, as_list, check_keys, load_schema
from nemo_aligner.utils.fs import atomic_write_text
from nemo_aligner.utils.logging import build_loggers, get_logger
from nemo_aligner.utils.runtime import build_fabric, normalize_precision

USER_ERRORS = (DataFormatError, ConfigKeyError, FileNotFoundError, FileExistsError)

#: The run's resolved config, written next to the checkpoints (``eval_reward_model.py`` rebuilds the model from it).
RUN_CONFIG = "config.yaml"


def run(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and train. Returns ``{"history", "val", "log_dir", "reward_standardization"}``.

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing data file; DataFormatError: a bad data line;
        FileExistsError: checkpoints exist and ``resume_if_exists`` is false.
    """
    check_keys(cfg, load_schema("training_rm"), source="training_rm config")
    log = get_logger()
    exp = cfg.exp_manager
    log_dir = Path(exp.explicit_log_dir)
    ckpt_params = exp.checkpoint_callback_params
    checkpoints = CheckpointManager(
        log_dir / "checkpoints", ckpt_params.save_top_k, ckpt_params.monitor, ckpt_params.get("mode", "min")
    )
    if not exp.resume_if_exists and checkpoints.latest() is not None:
        raise FileExistsError(
            f"{log_dir} already holds checkpoints; set exp_manager.resume_if_exists=true to continue that run "
            "or point exp_manager.explicit_log_dir somewhere else"
        )

    fabric = build_fabric(cfg.trainer, loggers=build_loggers(log_dir, exp), seed=int(cfg.model.seed))
    if fabric.is_global_zero:
        atomic_write_text(log_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))

    # Data: rank 0 tokenises into the on-disk cache first, then every rank memory-maps it.
    from transformers import AutoTokenizer

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path)) if fabric.is_global_zero else None
    fabric.barrier()
    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = AutoTokenizer.from_pretrained(source)
    data_cfg = cfg.model.data
    max_len = int(cfg.model.encoder_seq_length)
    data_kwargs = dict(tokenizer=tokenizer, max_seq_length=max_len, truncation=str(data_cfg.truncation), cache_dir=data_cfg.cache_dir)
    splits = {}
    for split in ("train", "validation"):
        paths = as_list(data_cfg.data_prefix.get(split))
        if not paths:
            splits[split] = (None, None)
            continue
        if fabric.is_global_zero:
            load_reward_datasets(paths, **data_kwargs)
        fabric.barrier()
        splits[split] = load_reward_datasets(paths, **data_kwargs)
    train_ds, train_stats = splits["train"]
    val_ds, _ = splits["validation"]
    if train_ds is None:
        raise ValueError("model.data.data_prefix.train names no file")
    if fabric.is_global_zero:
        for stats in train_stats:
            log.info(
                f"train data {os.path.normpath(stats['path'])}: {stats['num_examples']} examples, "
                f"{stats['num_comparisons']} comparisons ({stats['num_truncated']} truncated, {stats['num_dropped']} "
                f"dropped, max {max_len} tokens)"
            )

    trainer_cfg = TrainerConfig.from_cfg(cfg.trainer.rm, cfg.model)
    max_steps = compute_max_steps(len(train_ds), trainer_cfg)
    model = HFRewardModel(
        fabric,
        cfg.model,
        source,
        max_steps=max_steps,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        precision=normalize_precision(cfg.trainer.precision),
        max_seq_length=max_len,
    )
    if fabric.is_global_zero:
        trainable, total = model.num_trainable_parameters()
        log.info(
            f"reward model {source}: {trainable:,} of {total:,} parameters trainable "
            f"({'LoRA + score head' if model.use_lora else 'full'})"
        )
        log.info(
            f"{max_steps} steps of {trainer_cfg.global_batch_size} comparisons ({model.data_parallel_size} rank(s), "
            f"micro-batch {trainer_cfg.micro_batch_size}); logs and checkpoints in {log_dir}"
        )

    pack = bool(data_cfg.get("pack_sequences", False))

    def collate(examples):
        return collate_reward_examples(examples, model.pad_token_id, pack=pack)

    trainer = RewardModelTrainer(
        model=model,
        train_dataset=train_ds,
        val_dataset=val_ds,
        collate_fn=collate,
        cfg=trainer_cfg,
        log_dir=log_dir,
        checkpoints=checkpoints,
        log_metrics=fabric.log_dict,
        resume=bool(exp.resume_if_exists),
        export_hf=False,  # exported below, after the optional reward standardisation
        is_global_zero=fabric.is_global_zero,
    )
    history = trainer.fit()

    std_cfg = cfg.model.reward_standardization
    standardization = None
    if std_cfg.enable:
        mean, std = std_cfg.get("mean"), std_cfg.get("std")
        if mean is None:
            mean, _, count = compute_reward_statistics(
                model, train_ds, collate, trainer_cfg.micro_batch_size, std_cfg.get("num_samples")
            )
            if fabric.is_global_zero:
                log.info(f"reward standardisation: mean raw reward {mean:.4f} over {count} training responses")
        model.set_standardization(float(mean), float(std) if std is not None else 1.0)
        standardization = {"mean": model.reward_mean, "std": model.reward_std}
    if exp.get("export_hf", True):
        model.export_hf(str(log_dir / "hf_export"))
        if fabric.is_global_zero:
            log.info(f"Hugging Face export written to {log_dir / 'hf_export'}")
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.is_global_zero:
        log.info(f"done: last checkpoint {checkpoints.latest()}, best by {checkpoints.monitor}: {checkpoints.best()}")
    return {
        "history": history,
        "val": trainer.last_val_metrics,
        "log_dir": str(log_dir),
        "reward_standardization": standardization,
    }


@hydra.main(config_path=str(CONF_DIR), config_name="training_rm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as err:  # a user's mistake: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())

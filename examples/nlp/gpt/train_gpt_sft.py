"""Supervised fine-tuning (SFT) of a causal LM on assistant tokens.

    python examples/nlp/gpt/train_gpt_sft.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
        model.data.train_ds.file_path=../shared/data/hh-rlhf/train.jsonl.gz \
        model.data.validation_ds.file_path=../shared/data/hh-rlhf/validation.jsonl.gz \
        trainer.sft.max_steps=20 model.data.train_ds.max_seq_length=512

Configuration: conf/gpt_sft.yaml (NeMo-Aligner key names). Data formats: docs/user-guide/sft.md. Multi-GPU:
``trainer.devices=8 trainer.strategy=ddp`` (or ``fsdp``); multi-node through torchrun or SLURM.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.base import TrainerConfig, compute_max_steps
from nemo_aligner.algorithms.supervised import SFTTrainer
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.data.sft import load_sft_datasets
from nemo_aligner.models.hf_causal_lm import HFCausalLM
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.config import CONF_DIR, ConfigKeyError, as_list, check_keys, load_schema
from nemo_aligner.utils.logging import build_loggers, get_logger
from nemo_aligner.utils.runtime import build_fabric, normalize_precision

USER_ERRORS = (DataFormatError, ConfigKeyError, FileNotFoundError, FileExistsError)


def _load_split(fabric, split_cfg, data_cfg, tokenizer, chat: bool):
    """Rank 0 tokenises ``split_cfg.file_path`` into the cache first, then every rank memory-maps it."""
    paths = as_list(split_cfg.get("file_path"))
    if not paths:
        return None, []
    kwargs = dict(
        max_seq_length=int(split_cfg.max_seq_length),
        truncation=str(data_cfg.truncation),
        truncation_method=str(split_cfg.get("truncation_method", "left")),
        chat=chat,
        cache_dir=data_cfg.cache_dir,
    )
    if fabric.is_global_zero:
        load_sft_datasets(paths, tokenizer, **kwargs)
    fabric.barrier()
    return load_sft_datasets(paths, tokenizer, **kwargs)


def run(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and train. Returns ``{"history", "val", "log_dir"}`` (rank 0's view).

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing data file; DataFormatError: a bad data line;
        FileExistsError: the log directory holds checkpoints and ``resume_if_exists`` is false; ValueError: bad
        settings (no training file, too few examples for one global batch, ...).
    """
    check_keys(cfg, load_schema("gpt_sft"), source="gpt_sft config")
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
    data_cfg = cfg.model.data
    train_cfg = data_cfg.train_ds
    if not as_list(train_cfg.get("file_path")):
        raise ValueError("model.data.train_ds.file_path names no file")

    fabric = build_fabric(cfg.trainer, loggers=build_loggers(log_dir, exp), seed=int(cfg.model.seed))

    from transformers import AutoTokenizer

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path)) if fabric.is_global_zero else None
    fabric.barrier()
    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = AutoTokenizer.from_pretrained(source)
    chat = bool(data_cfg.chat)
    train_ds, train_stats = _load_split(fabric, train_cfg, data_cfg, tokenizer, chat)
    val_ds, _ = _load_split(fabric, data_cfg.validation_ds, data_cfg, tokenizer, chat)
    if fabric.is_global_zero:
        for stats in train_stats:
            log.info(
                f"train data {os.path.normpath(stats['path'])}: {stats['num_examples']} examples of "
                f"{stats['num_lines']} ({stats['num_truncated']} truncated, {stats['num_dropped']} dropped, "
                f"max {train_cfg.max_seq_length} tokens)"
            )

    batch_cfg = OmegaConf.create(
        {
            "global_batch_size": int(train_cfg.global_batch_size),
            "micro_batch_size": int(train_cfg.micro_batch_size),
            "seed": int(cfg.model.seed),
        }
    )
    trainer_cfg = TrainerConfig.from_cfg(cfg.trainer.sft, batch_cfg)
    max_steps = compute_max_steps(len(train_ds), trainer_cfg)

    model = HFCausalLM(
        fabric,
        cfg.model,
        source,
        max_steps=max_steps,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        need_reference=False,
        precision=normalize_precision(cfg.trainer.precision),
    )
    if fabric.is_global_zero:
        trainable, total = model.num_trainable_parameters()
        log.info(
            f"policy {source}: {trainable:,} of {total:,} parameters trainable ({'LoRA' if model.use_lora else 'full'})"
        )
        log.info(
            f"{max_steps} steps of {trainer_cfg.global_batch_size} sequences ({model.data_parallel_size} rank(s), "
            f"micro-batch {trainer_cfg.micro_batch_size}{', packed' if train_cfg.packed_sequence else ''}); "
            f"logs and checkpoints in {log_dir}"
        )

    pack = bool(train_cfg.packed_sequence)
    max_row_length = int(train_cfg.max_seq_length)

    def collate(examples):
        return collate_sequences(examples, model.pad_token_id, pack=pack, max_row_length=max_row_length)

    trainer = SFTTrainer(
        model=model,
        train_dataset=train_ds,
        val_dataset=val_ds,
        collate_fn=collate,
        cfg=trainer_cfg,
        log_dir=log_dir,
        checkpoints=checkpoints,
        log_metrics=fabric.log_dict,
        resume=bool(exp.resume_if_exists),
        export_hf=bool(exp.get("export_hf", True)),
        is_global_zero=fabric.is_global_zero,
    )
    history = trainer.fit()
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.is_global_zero:
        if history:
            mean_tps = sum(h["tokens_per_sec"] for h in history) / len(history)
            log.info(f"train: {len(history)} steps, mean {mean_tps:.0f} tokens/s, last loss {history[-1]['loss']:.4f}")
        log.info(f"done: last checkpoint {checkpoints.latest()}, best by {checkpoints.monitor}: {checkpoints.best()}")
    return {"history": history, "val": trainer.last_val_metrics, "log_dir": str(log_dir)}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as err:  # a user's mistake: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())

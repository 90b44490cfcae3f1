"""DPO / IPO / RPO training of a causal LM.

    python examples/nlp/gpt/train_gpt_dpo.py \
        pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
        "model.data.data_prefix={train: [../shared/data/hh-rlhf/train.jsonl.gz], validation: [../shared/data/hh-rlhf/validation.jsonl.gz]}" \
        trainer.dpo.max_steps=20 ++model.dpo.ref_policy_kl_penalty=0.1

Configuration: conf/gpt_dpo.yaml (NeMo-Aligner key names). Multi-GPU: ``trainer.devices=8 trainer.strategy=ddp``
(or ``fsdp``); multi-node through torchrun or SLURM with ``trainer.num_nodes``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.base import TrainerConfig, compute_max_steps
from nemo_aligner.algorithms.dpo import (
    DPOLossConfig,
    DPOTrainer,
    load_reference_logprobs,
    precompute_reference_logprobs,
    save_reference_logprobs,
)
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.packing import collate_preference_pairs
from nemo_aligner.data.preference import load_preference_datasets
from nemo_aligner.models.hf_causal_lm import HFCausalLM
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.utils.config import CONF_DIR, ConfigKeyError, as_list, check_keys, load_schema
from nemo_aligner.utils.logging import build_loggers, get_logger
from nemo_aligner.utils.runtime import build_fabric, normalize_precision

USER_ERRORS = (DataFormatError, ConfigKeyError, FileNotFoundError, FileExistsError)


def run(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and train. Returns ``{"history", "val", "log_dir"}`` (rank 0's view).

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing data file; DataFormatError: a bad data line.
    """
    check_keys(cfg, load_schema("gpt_dpo"), source="gpt_dpo config")
    log = get_logger()
    loss_cfg = DPOLossConfig.from_cfg(cfg.model.dpo)
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

    # Data: rank 0 tokenises into the on-disk cache first, then every rank memory-maps it.
    from transformers import AutoTokenizer

    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path)) if fabric.is_global_zero else None
    fabric.barrier()
    source = resolve_pretrained(str(cfg.pretrained_checkpoint.restore_from_path))
    tokenizer = AutoTokenizer.from_pretrained(source)
    data_cfg = cfg.model.data
    data_kwargs = dict(
        tokenizer=tokenizer,
        max_seq_length=int(cfg.model.encoder_seq_length),
        truncation=str(data_cfg.truncation),
        cache_dir=data_cfg.cache_dir,
    )
    prefix = data_cfg.data_prefix
    splits = {}
    for split in ("train", "validation"):
        paths = as_list(prefix.get(split))
        if not paths:
            splits[split] = (None, None)
            continue
        if fabric.is_global_zero:
            load_preference_datasets(paths, **data_kwargs)
        fabric.barrier()
        splits[split] = load_preference_datasets(paths, **data_kwargs)
    train_ds, train_stats = splits["train"]
    val_ds, _ = splits["validation"]
    if train_ds is None:
        raise ValueError("model.data.data_prefix.train names no file")
    if fabric.is_global_zero:
        for stats in train_stats:
            log.info(
                f"train data {os.path.normpath(stats['path'])}: {stats['num_pairs']} pairs "
                f"({stats['num_truncated']} truncated, {stats['num_dropped']} dropped, max {cfg.model.encoder_seq_length} tokens)"
            )

    trainer_cfg = TrainerConfig.from_cfg(cfg.trainer.dpo, cfg.model)
    max_steps = compute_max_steps(len(train_ds), trainer_cfg)

    precompute = bool(cfg.model.dpo.precompute_ref_log_probs)
    model = HFCausalLM(
        fabric,
        cfg.model,
        source,
        max_steps=max_steps,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        need_reference=True,
        precision=normalize_precision(cfg.trainer.precision),
    )
    if fabric.is_global_zero:
        trainable, total = model.num_trainable_parameters()
        log.info(
            f"policy {source}: {trainable:,} of {total:,} parameters trainable "
            f"({'LoRA' if model.use_lora else 'full'}; reference = {'adapters off' if model.use_lora else 'frozen copy'})"
        )
        log.info(
            f"{max_steps} steps of {trainer_cfg.global_batch_size} pairs ({model.data_parallel_size} rank(s), "
            f"micro-batch {trainer_cfg.micro_batch_size}); logs and checkpoints in {log_dir}"
        )

    def collate(examples):
        return collate_preference_pairs(examples, model.pad_token_id, shared_prefix=bool(cfg.model.dpo.shared_prefix))

    ref_table = None
    if precompute:
        fingerprint = hashlib.sha256(
            (str(source) + "".join(s["cache_path"] for s in train_stats) + str(len(train_ds))).encode()
        ).hexdigest()
        ref_dir = log_dir / "ref_logprobs"
        ref_table = load_reference_logprobs(ref_dir, fingerprint)
        if ref_table is None:
            if fabric.is_global_zero:
                log.info(f"precomputing reference log-probs for {len(train_ds)} pairs")
            ref_table = precompute_reference_logprobs(model, train_ds, collate, trainer_cfg.micro_batch_size)
            if fabric.is_global_zero:
                save_reference_logprobs(ref_table, ref_dir, fingerprint)
            fabric.barrier()

    trainer = DPOTrainer(
        model=model,
        train_dataset=train_ds,
        val_dataset=val_ds,
        collate_fn=collate,
        loss_cfg=loss_cfg,
        cfg=trainer_cfg,
        log_dir=log_dir,
        checkpoints=checkpoints,
        log_metrics=fabric.log_dict,
        ref_logprobs=ref_table,
        resume=bool(exp.resume_if_exists),
        export_hf=bool(exp.get("export_hf", True)),
        is_global_zero=fabric.is_global_zero,
    )
    history = trainer.fit()
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.is_global_zero:
        best = checkpoints.best()
        log.info(f"done: last checkpoint {checkpoints.latest()}, best by {checkpoints.monitor}: {best}")
    return {"history": history, "val": trainer.last_val_metrics, "log_dir": str(log_dir)}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_dpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as err:  # a user's mistake: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())

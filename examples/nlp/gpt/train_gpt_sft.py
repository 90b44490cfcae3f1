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

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.supervised import SFTTrainer
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.data.sft import load_sft_datasets
from nemo_aligner.models.hf_causal_lm import HFCausalLM
from nemo_aligner.recipes import ray_train
from nemo_aligner.recipes.common import (
    check_config,
    checkpoint_manager,
    finish,
    load_pretrained,
    load_split,
    log_data_stats,
    log_model_summary,
    run_context,
    run_or_exit,
    setup_fabric,
    trainer_config,
)
from nemo_aligner.utils.config import CONF_DIR, ConfigValueError, as_list
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import normalize_precision


def _load_split(fabric, split_cfg, data_cfg, tokenizer, chat: bool):
    """The dataset of ``split_cfg.file_path`` (rank 0 builds the cache first), or ``(None, [])`` without files."""
    return load_split(
        fabric,
        load_sft_datasets,
        as_list(split_cfg.get("file_path")),
        tokenizer,
        max_seq_length=int(split_cfg.max_seq_length),
        truncation=str(data_cfg.truncation),
        truncation_method=str(split_cfg.get("truncation_method", "left")),
        chat=chat,
        cache_dir=data_cfg.cache_dir,
    )


def run(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and train. Returns ``{"history", "val", "log_dir"}`` (rank 0's view).

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing data file; DataFormatError: a bad data line;
        FileExistsError: the log directory holds checkpoints and ``resume_if_exists`` is false; ValueError: bad
        settings (no training file, too few examples for one global batch, ...).
    """
    # Config
    check_config(cfg, "gpt_sft")
    if ray_train.wants_launch(cfg):  # trainer.ray.enable: this same run() on Ray Train workers
        return ray_train.launch(cfg, "gpt_sft", __file__)
    exp = cfg.exp_manager
    log_dir, checkpoints = checkpoint_manager(exp)
    data_cfg = cfg.model.data
    train_cfg = data_cfg.train_ds
    if not as_list(train_cfg.get("file_path")):
        raise ConfigValueError("model.data.train_ds.file_path names no file")
    fabric = setup_fabric(cfg, log_dir, "gpt_sft")

    # Data
    source, tokenizer = load_pretrained(fabric, cfg.pretrained_checkpoint.restore_from_path)
    chat = bool(data_cfg.chat)
    train_ds, train_stats = _load_split(fabric, train_cfg, data_cfg, tokenizer, chat)
    val_ds, _ = _load_split(fabric, data_cfg.validation_ds, data_cfg, tokenizer, chat)
    log_data_stats(
        fabric,
        train_stats,
        "{num_examples} examples of {num_lines} ({num_truncated} truncated, {num_dropped} dropped, "
        f"max {train_cfg.max_seq_length} tokens)",
    )

    # Model
    batch_cfg = OmegaConf.create(
        {
            "global_batch_size": int(train_cfg.global_batch_size),
            "micro_batch_size": int(train_cfg.micro_batch_size),
            "seed": int(cfg.model.seed),
        }
    )
    trainer_cfg, max_steps = trainer_config(cfg.trainer.sft, batch_cfg, len(train_ds))
    model = HFCausalLM(
        fabric,
        cfg.model,
        source,
        max_steps=max_steps,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        need_reference=False,
        precision=normalize_precision(cfg.trainer.precision),
    )
    pack = bool(train_cfg.packed_sequence)
    log_model_summary(
        fabric,
        model,
        f"policy {source}",
        "LoRA" if model.use_lora else "full",
        max_steps,
        trainer_cfg,
        "sequences",
        log_dir,
        batch_note=", packed" if pack else "",
    )
    max_row_length = int(train_cfg.max_seq_length)

    def collate(examples):
        return collate_sequences(examples, model.pad_token_id, pack=pack, max_row_length=max_row_length)

    # Trainer, fit, export (the trainer writes the Hugging Face export when exp_manager.export_hf is set)
    trainer = SFTTrainer(
        model=model,
        train_dataset=train_ds,
        val_dataset=val_ds,
        collate_fn=collate,
        cfg=trainer_cfg,
        context=run_context(fabric, exp, log_dir, checkpoints),
    )
    history = trainer.fit()
    if fabric.is_global_zero and history:
        mean_tps = sum(h["tokens_per_sec"] for h in history) / len(history)
        get_logger().info(
            f"train: {len(history)} steps, mean {mean_tps:.0f} tokens/s, last loss {history[-1]['loss']:.4f}"
        )
    finish(fabric, checkpoints)
    return {"history": history, "val": trainer.last_val_metrics, "log_dir": str(log_dir)}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    sys.exit(main())

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

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.algorithms.reward_model import RewardModelTrainer, compute_reward_statistics
from nemo_aligner.data.reward import load_reward_datasets
from nemo_aligner.data.reward_batch import collate_reward_examples
from nemo_aligner.models.reward_model import HFRewardModel
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
from nemo_aligner.utils.fs import atomic_write_text
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.runtime import normalize_precision

#: The run's resolved config, written next to the checkpoints (``eval_reward_model.py`` rebuilds the model from it).
RUN_CONFIG = "config.yaml"


def run(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and train. Returns ``{"history", "val", "log_dir", "reward_standardization"}``.

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing data file; DataFormatError: a bad data line;
        FileExistsError: checkpoints exist and ``resume_if_exists`` is false.
    """
    # Config
    check_config(cfg, "training_rm")
    if ray_train.wants_launch(cfg):  # trainer.ray.enable: this same run() on Ray Train workers
        return ray_train.launch(cfg, "training_rm", __file__)
    log = get_logger()
    exp = cfg.exp_manager
    log_dir, checkpoints = checkpoint_manager(exp)
    fabric = setup_fabric(cfg, log_dir, "training_rm")
    if fabric.is_global_zero:
        atomic_write_text(log_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))

    # Data: rank 0 tokenises into the on-disk cache first, then every rank memory-maps it.
    source, tokenizer = load_pretrained(fabric, cfg.pretrained_checkpoint.restore_from_path)
    data_cfg = cfg.model.data
    max_len = int(cfg.model.encoder_seq_length)
    data_kwargs = dict(tokenizer=tokenizer, max_seq_length=max_len, truncation=str(data_cfg.truncation), cache_dir=data_cfg.cache_dir)
    train_paths = as_list(data_cfg.data_prefix.get("train"))
    if not train_paths:
        raise ConfigValueError("model.data.data_prefix.train names no file")
    train_ds, train_stats = load_split(fabric, load_reward_datasets, train_paths, **data_kwargs)
    val_ds, _ = load_split(fabric, load_reward_datasets, as_list(data_cfg.data_prefix.get("validation")), **data_kwargs)
    log_data_stats(
        fabric,
        train_stats,
        "{num_examples} examples, {num_comparisons} comparisons ({num_truncated} truncated, {num_dropped} "
        f"dropped, max {max_len} tokens)",
    )

    # Model
    trainer_cfg, max_steps = trainer_config(cfg.trainer.rm, cfg.model, len(train_ds))
    model = HFRewardModel(
        fabric,
        cfg.model,
        source,
        max_steps=max_steps,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        precision=normalize_precision(cfg.trainer.precision),
        max_seq_length=max_len,
    )
    mode = "LoRA + score head" if model.use_lora else "full"
    log_model_summary(fabric, model, f"reward model {source}", mode, max_steps, trainer_cfg, "comparisons", log_dir)
    pack = bool(data_cfg.get("pack_sequences", False))
    shared_prefix = bool(data_cfg.get("shared_prefix", True))

    def collate(examples):
        return collate_reward_examples(examples, model.pad_token_id, pack=pack, shared_prefix=shared_prefix)

    # Trainer, fit
    trainer = RewardModelTrainer(
        model=model,
        train_dataset=train_ds,
        val_dataset=val_ds,
        collate_fn=collate,
        cfg=trainer_cfg,
        context=run_context(fabric, exp, log_dir, checkpoints,
                            export_hf=False),  # exported below, after the optional reward standardisation
    )
    history = trainer.fit()

    # Reward standardisation, export
    std_cfg = cfg.model.reward_standardization
    standardization = None
    if std_cfg.enable:
        mean, std = std_cfg.get("mean"), std_cfg.get("std")
        if mean is None or std is None:  # measure what is not given (NeMo-Aligner keys: reward_standardization.*)
            measured_mean, measured_std, count = compute_reward_statistics(
                model, train_ds, collate, trainer_cfg.micro_batch_size, std_cfg.get("num_samples")
            )
            if fabric.is_global_zero:
                log.info(f"reward standardisation: raw reward mean {measured_mean:.4f}, std {measured_std:.4f} over "
                         f"{count} training responses")
            if std is None and not measured_std > 0:
                raise ConfigValueError(f"model.reward_standardization: the raw rewards of {count} training responses all "
                                       f"equal {measured_mean:.6g} (std 0); set model.reward_standardization.std")
            mean = measured_mean if mean is None else mean
            std = measured_std if std is None else std
        model.set_standardization(float(mean), float(std))
        standardization = {"mean": model.reward_mean, "std": model.reward_std}
    if exp.get("export_hf", True):
        model.export_hf(str(log_dir / "hf_export"))
        if fabric.is_global_zero:
            log.info(f"Hugging Face export written to {log_dir / 'hf_export'}")
    finish(fabric, checkpoints)
    return {
        "history": history,
        "val": trainer.last_val_metrics,
        "log_dir": str(log_dir),
        "reward_standardization": standardization,
    }


@hydra.main(config_path=str(CONF_DIR), config_name="training_rm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    sys.exit(main())

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
import sys

import hydra
from omegaconf import DictConfig

from nemo_aligner.algorithms.dpo import (
    DPOLossConfig,
    DPOTrainer,
    load_reference_logprobs,
    precompute_reference_logprobs,
    save_reference_logprobs,
)
from nemo_aligner.data.preference_batch import collate_preference_pairs
from nemo_aligner.data.preference import load_preference_datasets
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


def run(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and train. Returns ``{"history", "val", "log_dir"}`` (rank 0's view).

    Raises:
        ConfigKeyError: an unknown key; FileNotFoundError: a missing data file; DataFormatError: a bad data line.
    """
    # Config
    check_config(cfg, "gpt_dpo")
    if ray_train.wants_launch(cfg):  # trainer.ray.enable: this same run() on Ray Train workers
        return ray_train.launch(cfg, "gpt_dpo", __file__)
    log = get_logger()
    loss_cfg = DPOLossConfig.from_cfg(cfg.model.dpo)
    exp = cfg.exp_manager
    log_dir, checkpoints = checkpoint_manager(exp)
    fabric = setup_fabric(cfg, log_dir, "gpt_dpo")

    # Data: rank 0 tokenises into the on-disk cache first, then every rank memory-maps it.
    source, tokenizer = load_pretrained(fabric, cfg.pretrained_checkpoint.restore_from_path)
    data_cfg = cfg.model.data
    max_len = int(cfg.model.encoder_seq_length)
    data_kwargs = dict(
        tokenizer=tokenizer, max_seq_length=max_len, truncation=str(data_cfg.truncation), cache_dir=data_cfg.cache_dir
    )
    train_paths = as_list(data_cfg.data_prefix.get("train"))
    if not train_paths:
        raise ConfigValueError("model.data.data_prefix.train names no file")
    train_ds, train_stats = load_split(fabric, load_preference_datasets, train_paths, **data_kwargs)
    val_ds, _ = load_split(fabric, load_preference_datasets, as_list(data_cfg.data_prefix.get("validation")), **data_kwargs)
    log_data_stats(
        fabric, train_stats, f"{{num_pairs}} pairs ({{num_truncated}} truncated, {{num_dropped}} dropped, max {max_len} tokens)"
    )

    # Model
    trainer_cfg, max_steps = trainer_config(cfg.trainer.dpo, cfg.model, len(train_ds))
    model = HFCausalLM(
        fabric,
        cfg.model,
        source,
        max_steps=max_steps,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        need_reference=True,
        precision=normalize_precision(cfg.trainer.precision),
    )
    mode = "LoRA" if model.use_lora else "full"
    reference = "adapters off" if model.use_lora else "frozen copy"
    log_model_summary(
        fabric, model, f"policy {source}", f"{mode}; reference = {reference}", max_steps, trainer_cfg, "pairs", log_dir
    )

    def collate(examples):
        return collate_preference_pairs(examples, model.pad_token_id, shared_prefix=bool(cfg.model.dpo.shared_prefix))

    ref_table = None
    if bool(cfg.model.dpo.precompute_ref_log_probs):
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

    # Trainer, fit, export (the trainer writes the Hugging Face export when exp_manager.export_hf is set)
    trainer = DPOTrainer(
        model=model,
        train_dataset=train_ds,
        val_dataset=val_ds,
        collate_fn=collate,
        loss_cfg=loss_cfg,
        cfg=trainer_cfg,
        context=run_context(fabric, exp, log_dir, checkpoints),
        ref_logprobs=ref_table,
    )
    history = trainer.fit()
    finish(fabric, checkpoints)
    return {"history": history, "val": trainer.last_val_metrics, "log_dir": str(log_dir)}


@hydra.main(config_path=str(CONF_DIR), config_name="gpt_dpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg)


if __name__ == "__main__":
    sys.exit(main())

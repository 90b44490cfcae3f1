#!/usr/bin/env bash
# Reference run: a reward model from SmolLM2-135M-Instruct on the HH-RLHF harmless-base pairs in ../shared/data/hh-rlhf
# (1,812 training pairs, 200 validation pairs), one epoch, on CPU. Target: validation accuracy >= 0.62.
# Writes results/reference/rm/: logs (csv/metrics.csv, TensorBoard), checkpoints, hf_export (the RM the PPO, RS and
# REINFORCE reference runs score with), eval_validation.json, summary.json and curves.png.
# Hyperparameters (why each: docs/user-guide/results.md):
#   lr 2e-5, 10 warm-up steps, cosine to 2e-6, global batch 16 pairs (113 steps), 512 tokens, no weight decay,
#   gradient clipping 1.0, rewards standardised over 200 training examples (400 responses) at the end (mean 0, std 1).
# Extra arguments are Hydra overrides for the training. SKIP_INSTALL=1 skips the install step.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
DATA=${DATA:-../shared/data/hh-rlhf}
OUT=${OUT:-results/reference/rm}
START=$(date +%s)

python3 examples/nlp/gpt/train_reward_model.py \
  pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" \
  "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" \
  exp_manager.explicit_log_dir="$OUT" \
  trainer.rm.max_epochs=1 trainer.rm.max_steps=-1 \
  trainer.rm.val_check_interval=20 trainer.rm.save_interval=20 trainer.rm.limit_val_batches=1.0 \
  model.global_batch_size=16 model.micro_batch_size=1 model.encoder_seq_length=512 \
  model.optim.lr=2e-5 model.optim.sched.warmup_steps=10 model.optim.sched.min_lr=2e-6 \
  model.reward_standardization.enable=true model.reward_standardization.num_samples=200 \
  "$@"

python3 examples/nlp/gpt/eval_reward_model.py "$OUT/hf_export" "$DATA/validation.jsonl.gz" \
  --output-json "$OUT/eval_validation.json"
python3 -m nemo_aligner.reference summary rm "$OUT" --seconds $(( $(date +%s) - START ))
python3 -m nemo_aligner.plot "$OUT" --output "$OUT/curves.png"

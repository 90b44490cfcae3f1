#!/usr/bin/env bash
# One command: install, then rejection sampling of SmolLM2-135M-Instruct on Anthropic HH-RLHF prompts with the
# reward model of the RM quick start (results/rm_quickstart/hf_export; trained first, briefly, if missing), on CPU:
# 2 steps of 4 prompts x 4 samples, keeping the best 2 per prompt, with greedy validation before and after.
# Extra arguments are Hydra overrides, e.g.  bash scripts/quickstart_rs.sh trainer.rs.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${DATA:-../shared/data/hh-rlhf}
RM=${RM:-results/rm_quickstart/hf_export}

if [ ! -f "$RM/config.json" ]; then
  echo "== no reward model at $RM: training one briefly (bash scripts/quickstart_rm.sh trains a better one)"
  python3 examples/nlp/gpt/train_reward_model.py \
    pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
    "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" \
    exp_manager.explicit_log_dir="$(dirname "$RM")" \
    trainer.rm.max_steps=4 trainer.rm.val_check_interval=4 trainer.rm.limit_val_batches=4 \
    model.global_batch_size=4 model.micro_batch_size=2 model.encoder_seq_length=256 model.optim.lr=2e-5 \
    model.reward_standardization.enable=true model.reward_standardization.num_samples=16
fi

python3 examples/nlp/gpt/train_gpt_rs_actor.py \
  pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
  reward_model.restore_from_path="$RM" \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" \
  "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" \
  model.data.max_prompts=64 model.data.max_val_prompts=4 \
  trainer.rs.max_steps=2 trainer.rs.val_check_interval=2 \
  model.rs.num_rollout_samples=4 model.rs.num_rollouts_per_prompt=4 model.rs.top_n_rollouts=2 \
  model.rs.rollout_micro_batch_size=8 model.rs.num_val_samples=4 \
  model.global_batch_size=4 model.micro_batch_size=2 \
  model.rs.length_params.max_length=32 model.optim.lr=1e-6 \
  'model.rs.sampling_params.end_strings=["\n\nHuman:"]' \
  exp_manager.explicit_log_dir=results/rs_quickstart \
  "$@"

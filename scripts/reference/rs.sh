#!/usr/bin/env bash
# Reference run: rejection sampling (best-of-n, then supervised training on the best) of SmolLM2-135M-Instruct on the
# HH-RLHF harmless-base prompts in ../shared/data/hh-rlhf, with the reference reward model (scripts/reference/rm.sh's
# export) as the judge of the samples, vLLM rollouts, on CPU. Targets as PPO's: the mean reward of the greedy
# responses to 200 validation prompts rises by >= 0.5 reward std, KL to the initial policy <= 5 nats per response;
# distinct-2 and length before and after.
# Writes results/reference/rs/: eval_before.json (the initial policy; skipped when present, e.g. copied from the PPO
# run, which evaluates the same policy with the same settings), logs, checkpoints, hf_export, eval_after.json,
# samples_{before,after}.jsonl, summary.json, curves.png.
# Hyperparameters (why each: docs/user-guide/results.md):
#   16 prompts per step, 4 samples each at temperature 1 (responses of at most 128 tokens stopped at "\n\nHuman:",
#   prompts cut to their last 192 tokens), the best 1 kept per prompt; lr 1e-5 constant after 2 warm-up steps,
#   global batch 8 (2 optimizer steps per RS step), weight decay 0.
# Extra arguments are Hydra overrides for the training. SKIP_INSTALL=1 skips the install step; RM=<export> picks
# the reward model (default results/reference/rm/hf_export, trained first when missing).
KIND=rs
STEPS=${STEPS:-12}
source "$(dirname "$0")/online_common.sh"
evaluate_before

python3 examples/nlp/gpt/train_gpt_rs_actor.py \
  pretrained_checkpoint.restore_from_path="$POLICY" reward_model.restore_from_path="$RM" \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" \
  "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" \
  exp_manager.explicit_log_dir="$OUT" \
  trainer.rs.max_steps="$STEPS" trainer.rs.val_check_interval=0 trainer.rs.save_interval=0 \
  trainer.rs.vllm.enable=true trainer.rs.vllm.enforce_eager=true \
  model.rs.num_rollout_samples=16 model.rs.num_rollouts_per_prompt=4 model.rs.top_n_rollouts=1 \
  model.rs.rollout_micro_batch_size=64 model.rs.forward_micro_batch_size=8 model.rs.num_val_samples=16 \
  model.rs.length_params.max_length=128 'model.rs.sampling_params.end_strings=["\n\nHuman:"]' \
  model.global_batch_size=8 model.micro_batch_size=1 model.encoder_seq_length=320 \
  model.optim.lr=1e-5 model.optim.weight_decay=0.0 model.optim.sched.warmup_steps=2 model.optim.sched.min_lr=1e-5 \
  "$@"

evaluate_after

#!/usr/bin/env bash
# Reference run: PPO of SmolLM2-135M-Instruct on the HH-RLHF harmless-base prompts in ../shared/data/hh-rlhf, with
# the reference reward model (scripts/reference/rm.sh's export) as the reward and as the critic's start, colocated,
# vLLM rollouts, on CPU. Targets: the mean reward of the greedy responses to 200 validation prompts rises by >= 0.5
# reward std (the RM is standardised, so >= 0.5), KL to the initial policy <= 5 nats per response; distinct-2 and
# length before and after.
# Writes results/reference/ppo/: eval_before.json (the initial policy), logs (csv/metrics.csv, TensorBoard,
# val_samples/), checkpoints, hf_export, eval_after.json, samples_{before,after}.jsonl, summary.json, curves.png.
# Hyperparameters (why each: docs/user-guide/results.md):
#   32 rollouts per step (4 actor and 4 critic optimizer steps of 8), sampling at temperature 1, responses of at
#   most 128 tokens stopped at "\n\nHuman:" (the next turn of an HH-RLHF transcript), prompts cut to their last 192
#   tokens; every rollout in the actor loss, cut or ended (mask_truncated=false: the evaluation scores cut responses
#   too); one critic warm-up buffer before step 1; actor lr 2e-5, critic lr 5e-5 (constant after 4 warm-up
#   optimizer steps, one PPO step), KL penalty beta 0.02 (per token, absolute), GAE gamma 1 lambda 0.95, PPO clip
#   0.2, value clip 0.2, 1 PPO epoch per rollout batch.
# Extra arguments are Hydra overrides for the training. SKIP_INSTALL=1 skips the install step; RM=<export> picks
# the reward model (default results/reference/rm/hf_export, trained first when missing).
KIND=ppo
STEPS=${STEPS:-10}
source "$(dirname "$0")/online_common.sh"
evaluate_before

python3 examples/nlp/gpt/train_gpt_ppo_actor.py \
  pretrained_checkpoint.restore_from_path="$POLICY" reward_model.restore_from_path="$RM" \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" \
  "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" model.data.max_val_prompts=32 \
  exp_manager.explicit_log_dir="$OUT" \
  trainer.ppo.max_steps="$STEPS" trainer.ppo.val_check_interval=5 trainer.ppo.save_interval=5 \
  trainer.ppo.vllm.enable=true trainer.ppo.vllm.enforce_eager=true \
  trainer.ppo.initial_policy_kl_penalty=0.02 trainer.ppo.critic_warmup_steps=1 model.ppo.mask_truncated=false \
  model.ppo.num_rollout_samples=32 model.ppo.rollout_micro_batch_size=32 model.ppo.forward_micro_batch_size=4 \
  model.ppo.num_val_samples=32 model.ppo.val_rollout_micro_batch_size=32 \
  model.ppo.length_params.max_length=128 'model.ppo.sampling_params.end_strings=["\n\nHuman:"]' \
  model.global_batch_size=8 model.micro_batch_size=2 model.encoder_seq_length=320 \
  model.optim.lr=2e-5 model.optim.sched.warmup_steps=4 model.optim.sched.min_lr=2e-5 \
  critic.optim.lr=5e-5 critic.optim.sched.warmup_steps=4 critic.optim.sched.min_lr=5e-5 \
  "$@"

evaluate_after

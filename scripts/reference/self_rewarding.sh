#!/usr/bin/env bash
# Reference run: self-rewarding (Yuan et al. 2024) of SmolLM2-135M-Instruct on the HH-RLHF harmless-base prompts in
# ../shared/data/hh-rlhf, 2 iterations: the policy answers, judges its own answers (the paper's 5-point rubric) and
# trains with DPO on the pairs its judgements pick; the next iteration starts from the result. No target (a 135M
# judge is weak): it reports, for the initial policy and after each iteration, the reference RM's reward and the
# policy's own judge score of its greedy responses to 200 validation prompts, with KL, length and distinct-2.
# Writes results/reference/self_rewarding/: eval_before.json, iteration_<i>/ (logs, checkpoints, hf_export),
# eval_iteration_<i>.json, samples_*.jsonl (with each response's judgement), summary.json, curves.png.
# Each iteration is its own run (trainer.self_rewarding.max_iterations=1) from the previous iteration's export, which
# is what the trainer's iteration boundary does (the reference becomes the current policy, the optimizer restarts),
# and gives an export to evaluate after each iteration.
# Hyperparameters (why each: docs/user-guide/results.md):
#   STEPS (5) steps per iteration of 8 prompts, 4 responses each (temperature 1, at most 128 tokens, stopped at
#   "\n\nHuman:"), each judged 3 times (constrained judge, justifications of at most 64 tokens); DPO beta 0.1,
#   lr 1e-5 constant after 1 warm-up step, no weight decay; the judge's prompt budget is 1024 - 64 - 8 tokens.
# Extra arguments are Hydra overrides for the training. SKIP_INSTALL=1 skips the install step; RM=<export> picks
# the reward model used for the evaluation (default results/reference/rm/hf_export, trained first when missing).
KIND=self_rewarding
STEPS=${STEPS:-5}
ITERATIONS=${ITERATIONS:-2}
JUDGE_TOKENS=64
source "$(dirname "$0")/online_common.sh"
EVAL+=(--judge self --judge-max-tokens "$JUDGE_TOKENS")
evaluate_before

previous=$POLICY
for i in $(seq 1 "$ITERATIONS"); do
  python3 examples/nlp/gpt/train_gpt_self_rewarding.py \
    pretrained_checkpoint.restore_from_path="$previous" \
    "model.data.train_ds.file_path=[$DATA/train.jsonl.gz]" \
    "model.data.validation_ds.file_path=[$DATA/validation.jsonl.gz]" model.data.max_val_prompts=32 \
    exp_manager.explicit_log_dir="$OUT/iteration_$i" model.seed=$((1233 + i)) \
    trainer.self_rewarding.max_iterations=1 trainer.self_rewarding.limit_train_batches="$STEPS" \
    trainer.self_rewarding.val_check_interval=0 trainer.self_rewarding.save_interval=0 \
    trainer.self_rewarding.vllm.enable=true trainer.self_rewarding.vllm.enforce_eager=true \
    model.global_batch_size=8 model.micro_batch_size=1 model.encoder_seq_length=1024 \
    model.spin.num_responses_to_gen=4 model.spin.num_evals_to_average=3 model.spin.rollout_micro_batch_size=96 \
    model.spin.judge_max_length="$JUDGE_TOKENS" \
    model.spin.length_params.max_length=128 'model.spin.sampling_params.end_strings=["\n\nHuman:"]' \
    model.spin.ref_policy_kl_penalty=0.1 \
    model.optim.lr=1e-5 model.optim.weight_decay=0.0 model.optim.sched.warmup_steps=1 model.optim.sched.min_lr=1e-5 \
    "$@"
  python3 examples/nlp/gpt/eval_policy.py "$OUT/iteration_$i/hf_export" "${EVAL[@]}" --reference "$POLICY" \
    --output-json "$OUT/eval_iteration_$i.json" --samples "$OUT/samples_iteration_$i.jsonl"
  previous=$OUT/iteration_$i/hf_export
done

python3 -m nemo_aligner.reference summary "$KIND" "$OUT" --seconds $(( $(date +%s) - START ))
python3 -m nemo_aligner.plot $(for i in $(seq 1 "$ITERATIONS"); do echo "$OUT/iteration_$i"; done) \
  --output "$OUT/curves.png"

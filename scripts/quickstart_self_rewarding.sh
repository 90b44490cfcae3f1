#!/usr/bin/env bash
# One command: install, then self-rewarding training of SmolLM2-135M-Instruct on Anthropic HH-RLHF prompts, on CPU:
# the model answers, judges its own answers with the paper's 5-point rubric (constrained judge) and trains with DPO on
# the pairs its judgements pick: 2 prompts x 2 responses x 2 judgements per step, 2 iterations of 2 steps without the
# meta-judge, then 2 iterations of 1 step with it. Each run writes a checkpoint and an HF export under results/.
# First, one step with the judge unconstrained, for its judge_parse_rate.
# Extra arguments are Hydra overrides for both runs, e.g.  bash scripts/quickstart_self_rewarding.sh model.spin.num_responses_to_gen=4
# SKIP_INSTALL=1 skips the install step (an environment that already has the package).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
DATA=${DATA:-../shared/data/hh-rlhf}
START=$(date +%s)

COMMON=(
  pretrained_checkpoint.restore_from_path=smollm2-135m-instruct
  trainer.accelerator=cpu
  "model.data.train_ds.file_path=[$DATA/train.jsonl.gz]"
  "model.data.validation_ds.file_path=[$DATA/validation.jsonl.gz]"
  model.data.max_prompts=16 model.data.max_val_prompts=2
  trainer.self_rewarding.max_iterations=2
  trainer.self_rewarding.val_check_interval=0 trainer.self_rewarding.save_interval=0
  model.global_batch_size=2 model.micro_batch_size=2 model.encoder_seq_length=448
  model.spin.num_responses_to_gen=2 model.spin.num_evals_to_average=2
  model.spin.rollout_micro_batch_size=8
  model.spin.length_params.max_length=48 model.spin.judge_max_length=32
  'model.spin.sampling_params.end_strings=["\n\n"]'
  model.optim.lr=1e-6 model.optim.sched.min_lr=1e-7
)

summary() {  # the per-step metrics of a run's CSV log
  python3 - "$1" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/csv/metrics.csv")))
keys = ["iteration", "loss", "preference_loss", "sft_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean",
        "chosen_lengths", "reject_lengths", "judge_parse_rate", "chosen_generated_rewards", "rejected_generated_rewards",
        "bad_samples_per_GBS", "bad_ends_per_GBS", "meta_pairs_per_GBS", "meta_judge_parse_rate", "time_generation",
        "time_judging", "time_train"]
for row in rows:
    shown = [f"{k}={float(row['train/' + k]):.4g}" for k in keys if row.get("train/" + k) not in (None, "")]
    if shown:
        print(f"  step {row['step']}: " + " ".join(shown))
    if row.get("val/loss"):
        print(f"  step {row['step']}: val_loss={float(row['val/loss']):.4g}")
PY
}

echo "== first, the judge without the constraint (1 step; 96-token free judgements): judge_parse_rate"
python3 examples/nlp/gpt/train_gpt_self_rewarding.py "${COMMON[@]}" trainer.self_rewarding.limit_train_batches=1 \
  trainer.self_rewarding.max_iterations=1 model.spin.constrain_judge_output=false model.spin.judge_max_length=96 \
  model.encoder_seq_length=576 \
  exp_manager.explicit_log_dir=results/self_rewarding_unconstrained_quickstart exp_manager.export_hf=false "$@"
summary results/self_rewarding_unconstrained_quickstart

echo "== self-rewarding (no meta-judge)"
python3 examples/nlp/gpt/train_gpt_self_rewarding.py "${COMMON[@]}" trainer.self_rewarding.limit_train_batches=2 \
  exp_manager.explicit_log_dir=results/self_rewarding_quickstart "$@"
summary results/self_rewarding_quickstart

echo "== meta-rewarding (meta-judge on)"
python3 examples/nlp/gpt/train_gpt_self_rewarding.py "${COMMON[@]}" trainer.self_rewarding.limit_train_batches=1 \
  model.spin.use_meta_judge=true model.spin.meta_judge_pcnt=0.5 model.encoder_seq_length=704 \
  exp_manager.explicit_log_dir=results/meta_rewarding_quickstart "$@"
summary results/meta_rewarding_quickstart

ls -d results/self_rewarding_quickstart/checkpoints/step=* results/self_rewarding_quickstart/hf_export \
  results/meta_rewarding_quickstart/checkpoints/step=* results/meta_rewarding_quickstart/hf_export
echo "== quick start done in $(( $(date +%s) - START )) s"

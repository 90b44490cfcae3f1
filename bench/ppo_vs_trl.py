"""PPO step time, split into generation / inference / training: nemo_aligner's PPO vs TRL's closest online trainer.

    flock /tmp/smollm2.lock python bench/ppo_vs_trl.py                  # SmolLM2-135M-Instruct, HH-RLHF, CPU
    python bench/ppo_vs_trl.py --steps 4 --prompts 8 --generations 2 --max-new-tokens 64 --reward results/rm_quickstart/hf_export
    flock /tmp/heavy.lock python bench/ppo_vs_trl.py --vllm          # nemo_aligner twice: native and vLLM rollouts

TRL 1.x has no ``PPOTrainer`` any more; its online RL trainers are ``GRPOTrainer`` and ``RLOOTrainer``, which share
the generation / scoring / clipped-loss loop. This bench uses ``GRPOTrainer`` (the one TRL documents and maintains
as its main online trainer; it runs offline here on a local model and a Python reward function) and names it and
its version in the output.

Same work on both sides, per step: ``--prompts`` HH-RLHF prompts (the first ones of at most ``--max-prompt-tokens``
tokens) x ``--generations`` sampled responses each (temperature 1, no top-k/top-p, at most ``--max-new-tokens`` new
tokens, stop at EOS), one optimizer step over all of them, fp32, a frozen reference model for the KL penalty
(beta 0.01). nemo_aligner gets each prompt ``--generations`` times in its rollout batch (PPO samples one response
per prompt). Algorithmic differences that stay: PPO also runs and trains a critic (a value model as large as the
reward model); GRPO has none (group-normalised rewards instead).

Reward (the same for both): ``--reward PATH`` a reward-model export (default ``results/rm_quickstart/hf_export`` when it
exists; nemo_aligner scores with its ``RewardScorer``, TRL with the same export as a sequence-classification reward
model), or ``--reward length`` (programmatic: response tokens / ``--max-new-tokens``).

Timing: every step, the first included; model loading excluded. nemo_aligner: ``time_generation``,
``time_inference`` (actor, initial-policy and critic forwards plus the reward), ``time_train`` (critic and actor
updates) from its per-step metrics. TRL: the wall time of each ``training_step``; generation = time inside
``GRPOTrainer._generate``, inference = the rest of ``_generate_and_score_completions`` (reference log-probs,
rewards), training = the rest of the step. Tokens/s counts generated (response) tokens per second of step time.
Each side runs in its own child process, one after the other. Requires TRL (``pip install -e .[bench]``).

``--vllm`` runs nemo_aligner a second time with ``trainer.ppo.vllm.enable=true`` (the vLLM engine's start-up, like
model loading, is outside the step times; the refit of the weights after each step is inside, as ``refit``), and
prints each side's generation share of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "train.jsonl.gz"
DEFAULT_RM = REPO / "results" / "rm_quickstart" / "hf_export"


def select_prompts(data: Path, tokenizer_dir: str, count: int, max_tokens: int) -> list[str]:
    """The first ``count`` prompts of ``data`` (HH-RLHF transcripts or prompt JSONL) of at most ``max_tokens`` tokens.

    Raises:
        SystemExit: fewer than ``count`` prompts fit.
    """
    from transformers import AutoTokenizer

    from nemo_aligner.data.prompts import iter_prompts, tokenize_prompt

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for example in iter_prompts([str(data)]):
        if isinstance(example.prompt, str) and len(tokenize_prompt(example.prompt, tokenizer)) <= max_tokens:
            out.append(example.prompt)
            if len(out) == count:
                return out
    raise SystemExit(f"only {len(out)} plain-text prompts of {data} fit {max_tokens} tokens; need {count}")


OURS_CHILD = r"""
import json, sys, time
from hydra import compose, initialize_config_dir
from nemo_aligner.utils.config import CONF_DIR
sys.path.insert(0, sys.argv[1] + "/examples/nlp/gpt")
import train_gpt_ppo_actor as script
overrides, reward, max_new = json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("gpt_ppo_actor", overrides=overrides)
reward_fn = None
if reward == "length":
    reward_fn = lambda prompts, responses: [len(r) / max_new for r in responses]
out = script.run(cfg, reward_fn=reward_fn)
print(json.dumps({"history": out["history"]}))
"""

TRL_CHILD = r"""
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
import trl
from trl import GRPOConfig, GRPOTrainer

model_dir, prompts_file, out_dir, reward, steps, prompts_per_step, generations, max_new, seed = sys.argv[1:10]
steps, prompts_per_step, generations, max_new = int(steps), int(prompts_per_step), int(generations), int(max_new)
prompts = [json.loads(line)["prompt"] for line in open(prompts_file)]
tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if reward == "length":
    def length_reward(completions, completion_ids, **kwargs):
        return [len(ids) / max_new for ids in completion_ids]
    reward_funcs, reward_tok = [length_reward], None
else:
    rm = AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1, dtype=torch.float32)
    reward_tok = AutoTokenizer.from_pretrained(reward)
    if reward_tok.pad_token is None:
        reward_tok.pad_token = reward_tok.eos_token
    rm.config.pad_token_id = reward_tok.pad_token_id
    reward_funcs, reward_tok = [rm], [reward_tok]

timing = {"generation": [], "generate_and_score": [], "step": []}
def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timing[name].append(time.perf_counter() - start)
    return wrapper
GRPOTrainer._generate = timed("generation", GRPOTrainer._generate)
GRPOTrainer._generate_and_score_completions = timed("generate_and_score", GRPOTrainer._generate_and_score_completions)
GRPOTrainer.training_step = timed("step", GRPOTrainer.training_step)

logs = []
class Logs(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs: globals()["logs"].append(dict(logs))

config = GRPOConfig(
    output_dir=out_dir, per_device_train_batch_size=prompts_per_step * generations, gradient_accumulation_steps=1,
    num_generations=generations, steps_per_generation=1, num_iterations=1, max_steps=steps,
    max_completion_length=max_new, temperature=1.0, top_p=1.0, top_k=0, beta=0.01, learning_rate=1e-6,
    use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False, report_to="none",
    save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=int(seed),
    use_vllm=False, log_completions=False,
)
trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=config,
                      train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                      processing_class=tokenizer, reward_processing_classes=reward_tok, callbacks=[Logs()])
trainer.train()
lengths = [l["completions/mean_length"] for l in logs if "completions/mean_length" in l]
print(json.dumps({"trl": trl.__version__, "trainer": "GRPOTrainer", "timing": timing, "mean_lengths": lengths,
                  "steps": trainer.state.global_step}))
"""


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("a child printed no result line")


def run_ours(args, model_dir: str, reward: str, prompts: list[str], work: Path, vllm: bool = False) -> dict:
    """nemo_aligner PPO in a child process (``vllm``: with vLLM rollouts); per-step totals of generation / inference /
    training / refit and tokens."""
    data = work / "ours_prompts.jsonl"
    with open(data, "w") as f:  # each prompt --generations times, consecutive: one rollout batch = all of them
        for p in prompts:
            for _ in range(args.generations):
                f.write(json.dumps({"prompt": p}) + "\n")
    n = len(prompts) * args.generations // args.steps
    overrides = [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"reward_model.restore_from_path={reward if reward != 'length' else 'null'}",
        f"critic.restore_from_path={reward if reward != 'length' else model_dir}",
        f"model.data.data_prefix.train=[{data}]", "model.data.data_prefix.validation=[]",
        f"exp_manager.explicit_log_dir={work / 'ours_run'}", "exp_manager.export_hf=false",
        "exp_manager.resume_if_exists=false", "trainer.precision=32",
        f"trainer.ppo.max_steps={args.steps}", "trainer.ppo.val_check_interval=0", "trainer.ppo.save_interval=0",
        "trainer.ppo.initial_policy_kl_penalty=0.01", "trainer.ppo.ppo_epochs=1",
        f"model.ppo.num_rollout_samples={n}", f"model.ppo.rollout_micro_batch_size={n}",
        f"model.ppo.forward_micro_batch_size={n}", f"reward_model.micro_batch_size={n}",
        f"model.global_batch_size={n}", f"model.micro_batch_size={args.train_micro_batch_size}",
        f"model.ppo.length_params.max_length={args.max_new_tokens}", "model.ppo.length_params.min_length=1",
        "model.ppo.sampling_params.temperature=1.0", "model.ppo.sampling_params.top_k=0",
        "model.ppo.sampling_params.top_p=1.0", "model.optim.lr=1e-6", f"model.seed={args.seed}",
        f"model.encoder_seq_length={args.max_prompt_tokens + args.max_new_tokens}",
    ]
    if vllm:
        overrides += ["trainer.ppo.vllm.enable=true", f"exp_manager.explicit_log_dir={work / 'ours_vllm_run'}"]
    proc = subprocess.run([sys.executable, "-c", OURS_CHILD, str(REPO), json.dumps(overrides), reward,
                           str(args.max_new_tokens)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"nemo_aligner child failed:\n{proc.stderr[-4000:]}")
    history = last_json(proc.stdout)["history"]
    if len(history) != args.steps:
        raise SystemExit(f"nemo_aligner ran {len(history)} steps, expected {args.steps}")
    total = lambda key: sum(h[key] for h in history)  # noqa: E731
    return {
        "step": total("step_time"), "generation": total("time_generation"), "inference": total("time_inference"),
        "training": total("time_train"), "tokens": sum(h["response_lengths_mean"] * n for h in history),
        "rewards": [h["rewards_mean"] for h in history], "refit": sum(h.get("time_refit", 0.0) for h in history),
        "logprob_mismatch": [h["rollout_logprob_mismatch"] for h in history if "rollout_logprob_mismatch" in h],
    }


def run_trl(args, model_dir: str, reward: str, prompts: list[str], work: Path) -> dict:
    """TRL GRPOTrainer in a child process; the same split from wrapped methods."""
    data = work / "trl_prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    proc = subprocess.run(
        [sys.executable, "-c", TRL_CHILD, model_dir, str(data), str(work / "trl_run"), reward, str(args.steps),
         str(len(prompts) // args.steps), str(args.generations), str(args.max_new_tokens), str(args.seed)],
        capture_output=True, text=True, cwd=REPO,
    )
    if proc.returncode:
        raise SystemExit(f"TRL child failed:\n{proc.stderr[-4000:]}")
    result = last_json(proc.stdout)
    t = result["timing"]
    if result["steps"] != args.steps or len(t["step"]) != args.steps:
        raise SystemExit(f"TRL ran {result['steps']} steps ({len(t['step'])} timed), expected {args.steps}")
    step, gen, gen_score = sum(t["step"]), sum(t["generation"]), sum(t["generate_and_score"])
    per_step = len(prompts) // args.steps * args.generations
    return {
        "step": step, "generation": gen, "inference": gen_score - gen, "training": step - gen_score,
        "tokens": sum(m * per_step for m in result["mean_lengths"]), "version": result["trl"],
        "trainer": result["trainer"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF dir, .gguf, or alias")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--reward", default=None,
                        help=f"RM export dir, or 'length' (default: {DEFAULT_RM} when it exists, else 'length')")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=2, help="responses per prompt (TRL needs >= 2)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--train-micro-batch-size", type=int, default=4, help="nemo_aligner actor/critic micro-batch")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only")
    parser.add_argument("--vllm", action="store_true", help="also nemo_aligner with vLLM rollouts")
    args = parser.parse_args()
    if args.generations < 2:
        parser.error("--generations must be >= 2 (GRPO normalises rewards within a prompt's group)")

    from nemo_aligner.models.pretrained import resolve_pretrained

    model_dir = resolve_pretrained(args.model)
    reward = args.reward or (str(DEFAULT_RM) if (DEFAULT_RM / "config.json").is_file() else "length")
    prompts = select_prompts(Path(args.data), model_dir, args.steps * args.prompts, args.max_prompt_tokens)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only != "trl":
            results["ours"] = run_ours(args, model_dir, reward, prompts, work)
            if args.vllm:
                results["ours_vllm"] = run_ours(args, model_dir, reward, prompts, work, vllm=True)
        if args.only != "ours":
            results["trl"] = run_trl(args, model_dir, reward, prompts, work)
    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu x{os.cpu_count()} ({torch.get_num_threads()} threads)"
    print(f"model={args.model} reward={reward} steps={args.steps} prompts/step={args.prompts} "
          f"responses/prompt={args.generations} max_new_tokens={args.max_new_tokens} fp32 device={device}")
    print(f"{'':28s} {'step s':>8s} {'generation':>11s} {'inference':>10s} {'training':>9s} {'gen tok/s':>10s} "
          f"{'gen share':>9s}")
    names = {"ours": "nemo_aligner PPO", "ours_vllm": "nemo_aligner PPO + vLLM"}
    for key, r in results.items():
        name = names.get(key) or f"trl {r['version']} {r['trainer']}"
        print(f"{name:28s} {r['step']:8.1f} {r['generation']:11.1f} {r['inference']:10.1f} {r['training']:9.1f} "
              f"{r['tokens'] / r['step']:10.1f} {r['generation'] / r['step']:9.0%}")
    if "ours_vllm" in results:
        v = results["ours_vllm"]
        print(f"vLLM: refit {v['refit']:.2f} s over {args.steps} steps; rollout_logprob_mismatch per step "
              f"{[round(x, 6) for x in v['logprob_mismatch']]}; generation {results['ours']['generation']:.1f} s native "
              f"-> {v['generation']:.1f} s vLLM ({results['ours']['generation'] / v['generation']:.2f}x)")
    for key in ("ours", "ours_vllm"):
        if key in results and "trl" in results:
            ours, trl = results[key], results["trl"]
            print(f"{names[key]}: ratio (trl step time / nemo_aligner step time) = {trl['step'] / ours['step']:.2f}x; "
                  f"tokens/s ratio nemo_aligner / trl = {(ours['tokens'] / ours['step']) / (trl['tokens'] / trl['step']):.2f}x")
    print(json.dumps(results))

if __name__ == "__main__":
    main()

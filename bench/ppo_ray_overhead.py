"""PPO step time, colocated vs on Ray (critic, reward model and initial policy as Ray actors), in one run.

    flock /tmp/heavy.lock python bench/ppo_ray_overhead.py                      # SmolLM2-135M-Instruct, HH-RLHF, CPU
    python bench/ppo_ray_overhead.py --steps 3 --rollouts 4 --max-new-tokens 32 --colocate

Both runs use the same config, seed and prompts (the first ``--rollouts x --steps`` HH-RLHF prompts of at most
``--max-prompt-tokens`` tokens), one after the other in this process: first colocated (every role in this process),
then with ``trainer.ppo.ray.enable=true`` on a local Ray cluster started here (loopback, no dashboard, ``--ray-cpus``
logical CPUs; each role gets a bundle of ``{CPU: 1}``, or with ``--colocate`` the three share one bundle). Model
loading, the Ray cluster's start-up and the role actors' start-up are outside the step times; the means leave out
each mode's first step (one-off warm-up: allocations, lazy initialisation; ``--keep-first`` keeps it), and every
step's time is printed. The reward model: ``--reward`` (default ``results/rm_quickstart/hf_export``, the export of
``scripts/quickstart_rm.sh``); the critic starts from it.

Per step it prints each mode's mean ``step_time`` and the parts the trainer measures: ``time_generation`` (the
actor, in the driver either way), ``time_inference_policy_critic`` (actor + initial-policy log-probs + critic
values: the last two are Ray calls on Ray), ``time_inference_reward`` (a Ray call), ``time_train_critic`` (a Ray
call), ``time_train_actor`` (the driver either way). The difference of the Ray-call parts is Ray's overhead: per
call, submitting the task, pickling the rollouts into Ray's object store and the result back, and a context switch
to the role's process, plus, on a machine with few cores, the Ray processes (GCS, raylet, the idle role actors)
sharing the cores with the step. The roles run one after the other either way (PPO is synchronous), so Ray buys
placement (roles on other GPUs / nodes), not speed, on one CPU machine.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "train.jsonl.gz"
DEFAULT_RM = REPO / "results" / "rm_quickstart" / "hf_export"
PARTS = ["time_generation", "time_inference_policy_critic", "time_inference_reward", "time_train_critic",
         "time_train_actor"]


def write_prompts(data: Path, path: Path, tokenizer_dir: str, count: int, max_tokens: int) -> Path:
    """The first ``count`` HH-RLHF prompts of at most ``max_tokens`` tokens, as a ``{"prompt"}`` JSONL file."""
    from transformers import AutoTokenizer

    from nemo_aligner.data.preference import parse_preference_record

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    with gzip.open(data, "rt") if str(data).endswith(".gz") else open(data) as f:
        for line_no, line in enumerate(f, 1):
            prompt = parse_preference_record(json.loads(line), data, line_no).prompt
            text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(prompt, tokenize=False)
            if len(tokenizer(text)["input_ids"]) <= max_tokens:
                out.append({"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt})
            if len(out) == count:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reward", default=str(DEFAULT_RM), help="an RM export (the critic starts from it too)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rollouts", type=int, default=4, help="prompts (= responses) per PPO step")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--colocate", action="store_true", help="critic, RM and initial policy share one bundle")
    parser.add_argument("--ray-override", action="append", default=[],
                        help="a Hydra override for the Ray run only (repeatable), e.g. "
                             "'trainer.ppo.ray.runtime_env={env_vars: {OMP_NUM_THREADS: \"2\"}}'")
    parser.add_argument("--keep-first", action="store_true", help="include each mode's first (warm-up) step in the means")
    args = parser.parse_args()
    if not (Path(args.reward) / "config.json").is_file():
        sys.exit(f"no reward-model export at {args.reward}: run scripts/quickstart_rm.sh or pass --reward")

    sys.path.insert(0, str(REPO))
    import ray
    from hydra import compose, initialize_config_dir

    from nemo_aligner.models.pretrained import resolve_pretrained
    from nemo_aligner.utils.config import CONF_DIR

    spec = importlib.util.spec_from_file_location("ppo_actor", REPO / "examples/nlp/gpt/train_gpt_ppo_actor.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    source = resolve_pretrained(args.model)
    work = Path(tempfile.mkdtemp(prefix="ppo_ray_bench_"))
    prompts = write_prompts(Path(args.data), work / "prompts.jsonl", source, args.rollouts * args.steps,
                            args.max_prompt_tokens)
    common = [
        f"pretrained_checkpoint.restore_from_path={source}", f"reward_model.restore_from_path={args.reward}",
        f"model.data.data_prefix.train=[{prompts}]", f"model.data.data_prefix.validation=[{prompts}]",
        "trainer.accelerator=cpu", f"trainer.ppo.max_steps={args.steps}", "trainer.ppo.val_check_interval=0",
        f"trainer.ppo.save_interval={args.steps}", "exp_manager.export_hf=false", "exp_manager.resume_if_exists=false",
        f"model.ppo.num_rollout_samples={args.rollouts}", f"model.ppo.rollout_micro_batch_size={args.rollouts}",
        f"model.ppo.forward_micro_batch_size={args.rollouts}", f"reward_model.micro_batch_size={args.rollouts}",
        f"model.ppo.length_params.max_length={args.max_new_tokens}", "model.ppo.mask_truncated=false",
        f"model.global_batch_size={args.rollouts}", "model.micro_batch_size=2", "model.encoder_seq_length=512",
    ]
    ray_overrides = ["trainer.ppo.ray.enable=true"]
    if args.colocate:
        ray_overrides.append("trainer.ppo.ray.colocate=[[critic,reward_model,initial_policy]]")
    ray_overrides += args.ray_override

    def run(name, extra):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("gpt_ppo_actor", overrides=common + extra + [f"exp_manager.explicit_log_dir={work / name}"])
        return script.run(cfg)["history"]

    colocated = run("colocated", [])
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    on_ray = run("ray", ray_overrides)
    ray.shutdown()

    def mean(history, key):
        timed = history if args.keep_first or len(history) < 2 else history[1:]
        return statistics.fmean(float(h.get(key, 0.0)) for h in timed)

    print(f"PPO step time, {args.steps} steps of {args.rollouts} rollouts x <= {args.max_new_tokens} new tokens, "
          f"{Path(source).name}, CPU fp32; Ray: {'one shared bundle' if args.colocate else 'a bundle per role'}")
    print(f"{'seconds per step' + ('' if args.keep_first else ' (steps 2..)'):32s} {'colocated':>10s} {'Ray':>10s} {'Ray - colocated':>16s}")
    for key in ["step_time"] + PARTS:
        a, b = mean(colocated, key), mean(on_ray, key)
        print(f"{key:32s} {a:10.3f} {b:10.3f} {b - a:+16.3f}")
    a, b = mean(colocated, "step_time"), mean(on_ray, "step_time")
    print(f"Ray overhead: {b - a:+.3f} s per step ({(b / a - 1) * 100:+.1f}%); per-step values: "
          f"colocated {[round(h['step_time'], 3) for h in colocated]}, Ray {[round(h['step_time'], 3) for h in on_ray]}")


if __name__ == "__main__":
    main()

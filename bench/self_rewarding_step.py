"""Time per self-rewarding step, split into generation (the responses), judging (LLM-as-a-judge, and the
meta-judge when on) and training (the DPO step), and the judge's parse rate, on the real recipe
(examples/nlp/gpt/train_gpt_self_rewarding.py) with SmolLM2-135M-Instruct on HH-RLHF prompts.

    flock /tmp/heavy.lock python bench/self_rewarding_step.py --steps 2      # native vs vLLM, in one run
    flock /tmp/heavy.lock python bench/self_rewarding_step.py --backend native --compare-constraint   # parse rate

``--backend both`` (the default) runs the same steps with the native engine and with vLLM
(``trainer.self_rewarding.vllm.enable=true``; ``--enforce-eager`` by default on CPU, where compiled start-up takes
minutes), and prints each phase's mean seconds per step and the native/vLLM ratio of each. The engine's start-up is
not in the step times; its refits are (``time_refit``, part of generation). Each configuration runs in its own log
directory under a temporary directory (no checkpoint or export kept).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "train.jsonl.gz"
KEYS = ("time_generation", "time_judging", "time_train", "step_time", "time_refit", "judge_parse_rate",
        "bad_samples_per_GBS", "bad_ends_per_GBS")
TIMES = ("time_generation", "time_judging", "time_train", "step_time")


def _script():
    path = REPO / "examples" / "nlp" / "gpt" / "train_gpt_self_rewarding.py"
    spec = importlib.util.spec_from_file_location("train_gpt_self_rewarding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_once(args: argparse.Namespace, constrained: bool, log_dir: Path, backend: str) -> list[dict]:
    from nemo_aligner.utils.config import CONF_DIR

    overrides = [
        f"pretrained_checkpoint.restore_from_path={args.model}", "trainer.accelerator=" + args.accelerator,
        f"model.data.train_ds.file_path=[{args.data}]", "model.data.validation_ds.file_path=null",
        f"model.data.max_prompts={args.prompts * args.steps}", "trainer.self_rewarding.max_iterations=1",
        f"trainer.self_rewarding.max_steps={args.steps}", "trainer.self_rewarding.val_check_interval=0",
        "trainer.self_rewarding.save_interval=0", f"model.global_batch_size={args.prompts}",
        f"model.micro_batch_size={args.prompts}", f"model.encoder_seq_length={args.seq_length}",
        f"model.spin.num_responses_to_gen={args.responses}", f"model.spin.num_evals_to_average={args.evals}",
        f"model.spin.rollout_micro_batch_size={args.responses * args.evals * args.prompts}",
        f"model.spin.length_params.max_length={args.max_length}", f"model.spin.judge_max_length={args.judge_length if constrained else args.free_judge_length}",
        f"model.spin.constrain_judge_output={str(constrained).lower()}",
        f"model.spin.use_meta_judge={str(args.meta).lower()}", 'model.spin.sampling_params.end_strings=["\\n\\n"]',
        f"trainer.self_rewarding.vllm.enable={str(backend == 'vllm').lower()}",
        f"trainer.self_rewarding.vllm.enforce_eager={str(args.enforce_eager).lower()}",
        f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.export_hf=false",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("gpt_self_rewarding", overrides=overrides)
    return _script().run(cfg)["history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--backend", choices=["both", "native", "vllm"], default="both")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without torch.compile (fast start-up on CPU)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--responses", type=int, default=3)
    parser.add_argument("--evals", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--judge-length", type=int, default=32)
    parser.add_argument("--free-judge-length", type=int, default=96,
                        help="new tokens of an unconstrained judgement (room for a justification and the score)")
    parser.add_argument("--seq-length", type=int, default=448)
    parser.add_argument("--meta", action="store_true", help="meta-judge on")
    parser.add_argument("--compare-constraint", action="store_true",
                        help="run with constrain_judge_output true and false (judge_parse_rate of each)")
    args = parser.parse_args()
    from nemo_aligner.errors import UserError

    modes = [True, False] if args.compare_constraint else [True]
    backends = ["native", "vllm"] if args.backend == "both" else [args.backend]
    results: dict[tuple[str, bool], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for constrained in modes:
                try:
                    history = run_once(args, constrained, Path(tmp) / f"{backend}_{constrained}", backend)
                except UserError as err:
                    print(f"error: {err}", file=sys.stderr)
                    sys.exit(2)
                means = {k: sum(h.get(k, 0.0) for h in history) / len(history) for k in KEYS}
                results[backend, constrained] = means
                judgements = args.steps * args.prompts * args.responses * args.evals
                print(f"backend={backend} constrained={constrained} steps={len(history)} judgements={judgements}: "
                      + " ".join(f"{k}={v:.3g}" for k, v in means.items()), flush=True)
    for constrained in modes:
        if ("native", constrained) in results and ("vllm", constrained) in results:
            native, vllm = results["native", constrained], results["vllm", constrained]
            print(f"native/vLLM seconds per step, constrained={constrained}: " + " ".join(
                f"{k[5:] if k.startswith('time_') else k}={native[k] / max(vllm[k], 1e-9):.2f}x" for k in TIMES))

if __name__ == "__main__":
    main()

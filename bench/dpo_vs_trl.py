"""DPO training throughput: nemo_aligner vs TRL's DPOTrainer, same model, data, batch size and length.

    python bench/dpo_vs_trl.py                       # SmolLM2-135M-Instruct, HH-RLHF, CPU
    python bench/dpo_vs_trl.py --model /path/to/hf_dir --steps 8 --batch-size 4 --max-length 1024

Both trainers run one epoch over the same ``steps * batch_size`` HH-RLHF pairs (only pairs whose longer side
fits ``--max-length``, so neither truncates), full-parameter, fp32 (or ``--precision bf16``), no gradient
checkpointing, a frozen reference copy computed every step, each in its own child process of this script, one after
the other. Throughput is tokens per second of the training loop (every step, the first included; model loading and
tokenisation excluded), where a pair counts ``len(prompt + chosen) + len(prompt + rejected)`` tokens for both.
Requires ``pip install -e .[bench]`` (TRL).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import parse_args, prepare_pairs, print_results, run_recipe, run_trl

TRL_BODY = r"""
from transformers import AutoModelForCausalLM
from trl import DPOConfig as Config, DPOTrainer as Trainer

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
config = Config(**common_args, beta=0.1, learning_rate=5e-7)
"""


def main() -> None:
    args = parse_args(__doc__, steps=6, max_length=512)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data_file, pairs, tokens = prepare_pairs(args, work)
        extra = ["++model.dpo.ref_policy_kl_penalty=0.1", "model.optim.lr=5e-7"]
        ours = run_recipe(args, "train_gpt_dpo.py", "dpo", model_dir, data_file, work, extra)
        trl_seconds, trl_version = run_trl(args, TRL_BODY, model_dir, data_file, work)
    print_results(args, pairs, tokens, ours, trl_seconds, trl_version)


if __name__ == "__main__":
    main()

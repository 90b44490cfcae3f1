"""Reward-model training throughput: nemo_aligner vs TRL's RewardTrainer, same model, data, batch size and length.

    flock /tmp/smollm2.lock python bench/rm_vs_trl.py          # SmolLM2-135M-Instruct, HH-RLHF, CPU
    python bench/rm_vs_trl.py --model /path/to/hf_dir --steps 8 --batch-size 4 --max-length 1024

Both trainers run one epoch over the same ``steps * batch_size`` HH-RLHF pairs (only pairs whose longer side fits
``--max-length``, so neither truncates), full-parameter ``AutoModelForSequenceClassification(num_labels=1)``, fp32
(or ``--precision bf16``), no gradient checkpointing, ours in its default shared-prefix layout (the prompt computed once
per pair; ``--no-shared-prefix`` for TRL's one row per response), each in its own child process of this script, one after the
other. Throughput is tokens per second of the training loop (every step, the first included; model loading and
tokenisation excluded), a pair counting ``len(prompt + chosen) + len(prompt + rejected)`` of our tokenisation for
both. Requires ``pip install -e .[bench]`` (TRL).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import parse_args, prepare_pairs, print_results, run_recipe, run_trl

TRL_BODY = r"""
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig as Config, RewardTrainer as Trainer

model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
model.config.pad_token_id = tokenizer.pad_token_id
config = Config(**common_args, learning_rate=1e-5)
"""


def main() -> None:
    args = parse_args(__doc__, steps=4, max_length=256, pack=True, shared_prefix=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data_file, pairs, tokens = prepare_pairs(args, work)
        extra = ["model.optim.lr=1e-5", f"model.data.pack_sequences={str(args.pack).lower()}",
                 f"model.data.shared_prefix={str(args.shared_prefix).lower()}"]
        ours = run_recipe(args, "train_reward_model.py", "rm", model_dir, data_file, work, extra)
        trl_seconds, trl_version = run_trl(args, TRL_BODY, model_dir, data_file, work)
    print_results(args, pairs, tokens, ours, trl_seconds, trl_version, f" pack={args.pack} shared_prefix={args.shared_prefix}")


if __name__ == "__main__":
    main()

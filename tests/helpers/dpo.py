"""The DPO recipe on tiny models: a preference-pair file and the composed ``gpt_dpo`` config."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.config import compose_config

TOPICS = ["bread", "tea", "rain", "maps", "owls", "jazz", "kites", "salt"]


def write_pairs(path: Path, n: int = 8) -> Path:
    """TRL-style text pairs where chosen and rejected differ in a consistent way."""
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({
                "prompt": f"Human: Tell me about {topic}. Assistant:",
                "chosen": f" Sure, {topic} is lovely.",
                "rejected": f" No. Go away {i}!",
            }) + "\n")
    return path


def dpo_cfg(tmp_path, model_dir, train, val, *overrides):
    """``conf/gpt_dpo.yaml`` composed for a tiny run on CPU: the policy from ``model_dir``, the ``train`` and ``val``
    pair files, the data cache and logs under ``tmp_path``, 64-token sequences; ``overrides`` come last and win."""
    return compose_config("gpt_dpo", [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.data_prefix.train=[{train}]",
        f"model.data.data_prefix.validation=[{val}]",
        f"model.data.cache_dir={tmp_path / 'cache'}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
        "trainer.accelerator=cpu",
        "model.encoder_seq_length=64",
        *overrides,
    ])

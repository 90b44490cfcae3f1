"""SFT end to end: training a tiny model through the entry script (learning, checkpoint, HF export, exact resume),
LoRA with packing, and bad config keys and data lines reported through the script and the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_aligner.algorithms.supervised import sft_loss_and_metrics
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs
from nemo_aligner.utils.config import ConfigKeyError

from tests.helpers import REPO, compose_config, load_example_script
from tests.helpers import encode_sft_record as encode

GOOD = {"input": "Hi", "output": "Hello"}


# ---------------------------------------------------------------------------------------------------------------
# End to end (in-process script on a tiny model)
# ---------------------------------------------------------------------------------------------------------------

TOPICS = ["bread", "tea", "rain", "maps"]


def write_chats(path: Path) -> Path:
    with open(path, "w") as f:
        for topic in TOPICS:
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Tell me about {topic}."},
                {"role": "assistant", "content": f"Sure, {topic} is lovely."},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."},
            ]}) + "\n")
    return path


def sft_cfg(tmp_path, model_dir, train, *overrides):
    return compose_config("gpt_sft", [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path={train}",
        f"model.data.validation_ds.file_path={train}",
        f"model.data.cache_dir={tmp_path / 'cache'}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
        "trainer.accelerator=cpu",
        "model.data.train_ds.max_seq_length=128",
        "model.data.train_ds.global_batch_size=4",
        "model.data.train_ds.micro_batch_size=2",
        "model.optim.lr=1e-2",
        "model.optim.sched.warmup_steps=0",
        *overrides,
    ])


@pytest.fixture(scope="module")
def sft_script():
    return load_example_script("train_gpt_sft")


def test_tiny_model_learns_exports_and_resumes_exactly(tmp_path, tiny_model_dir, tokenizer, sft_script):
    from transformers import AutoModelForCausalLM

    data = write_chats(tmp_path / "chats.jsonl")
    common = ["trainer.sft.max_epochs=100", "trainer.sft.max_steps=20", "trainer.sft.val_check_interval=10",
              "trainer.sft.save_interval=10", "exp_manager.checkpoint_callback_params.save_top_k=-1"]
    out = sft_script.run(sft_cfg(tmp_path, tiny_model_dir, data, *common))
    history = out["history"]
    assert len(history) == 20
    assert history[0]["loss"] == pytest.approx(math.log(len(tokenizer)), abs=0.2)  # random init: ~uniform
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert out["val"]["loss"] < 0.5 * history[0]["loss"]
    assert history[0]["target_tokens"] > 0 and history[0]["tokens_per_sec"] > 0

    # HF export round trip: the exported model gives the final validation loss (micro-batch 2, token mean per batch).
    run = Path(out["log_dir"])
    export = AutoModelForCausalLM.from_pretrained(run / "hf_export").eval()
    ds = [dict(zip(("input_ids", "loss_mask"), encode(tokenizer, json.loads(line)))) for line in data.read_text().splitlines()]
    head = ResponseLogprobs(export)
    batch_losses = []
    for start in (0, 2):
        batch = collate_sequences(ds[start:start + 2], tokenizer.pad_token_id)
        with torch.no_grad():
            lp = head(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col, batch.targets)
        batch_losses.append(sft_loss_and_metrics(lp, batch)[0].item())
    assert out["val"]["loss"] == pytest.approx(sum(batch_losses) / 2, rel=1e-4)

    # Exact resume: forget the step-20 checkpoint, run again: it continues from step 10 with the same losses.
    import shutil

    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step=0000010", "step=0000020"]
    shutil.rmtree(ckpts[-1])
    resumed = sft_script.run(sft_cfg(tmp_path, tiny_model_dir, data, *common))["history"]
    assert len(resumed) == 10
    for a, b in zip(history[10:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_lora_and_packing_run(tmp_path, tiny_model_dir, sft_script):
    data = write_chats(tmp_path / "chats.jsonl")
    out = sft_script.run(sft_cfg(
        tmp_path, tiny_model_dir, data, "trainer.sft.max_epochs=3", "trainer.sft.max_steps=3", "model.peft.peft_scheme=lora",
        "model.peft.lora_tuning.target_modules=[all]", "model.data.train_ds.packed_sequence=true",
        "model.data.validation_ds.file_path=null",
    ))
    assert len(out["history"]) == 3 and out["val"] == {}
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    run = Path(out["log_dir"])
    assert (run / "hf_export" / "model.safetensors").is_file() and (run / "hf_export_adapter").is_dir()


def test_unknown_key_is_an_error(tmp_path, tiny_model_dir, sft_script):
    data = write_chats(tmp_path / "chats.jsonl")
    cfg = sft_cfg(tmp_path, tiny_model_dir, data, "++model.data.train_ds.max_seq_len=10")
    with pytest.raises(ConfigKeyError, match="did you mean 'model.data.train_ds.max_seq_length'"):
        sft_script.run(cfg)


def test_malformed_line_reported_through_the_cli(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"input": "Hi", "output": 7}) + "\n")
    cmd = [sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_sft.py"),
           f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"model.data.train_ds.file_path={data}",
           "model.data.validation_ds.file_path=null", f"model.data.cache_dir={tmp_path / 'cache'}",
           f"exp_manager.explicit_log_dir={tmp_path / 'run'}", "trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {data}:2: field 'output': expected a string" in proc.stderr
    assert "Traceback" not in proc.stderr

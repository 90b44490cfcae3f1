"""End-to-end DPO on tiny models: learning signal, LoRA reference, HF export round trip, kill-and-resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf

from nemo_aligner.data.preference_batch import collate_preference_pairs
from nemo_aligner.utils.config import ConfigKeyError

from tests.helpers import REPO, dpo_cfg, load_example_script, write_pairs

@pytest.fixture(scope="module")
def dpo_script():
    return load_example_script("train_gpt_dpo")


def test_dpo_drives_accuracy_to_one(tmp_path, tiny_model_dir, dpo_script):
    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = dpo_cfg(
        tmp_path, tiny_model_dir, data, data,
        "trainer.dpo.max_epochs=20", "trainer.dpo.max_steps=20", "trainer.dpo.val_check_interval=10",
        "trainer.dpo.save_interval=20",
        "model.global_batch_size=8", "model.micro_batch_size=4", "model.optim.lr=1e-3",
        "++model.dpo.ref_policy_kl_penalty=0.5",
    )
    out = dpo_script.run(cfg)
    first, last = out["history"][0], out["history"][-1]
    assert len(out["history"]) == 20
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: -log sigmoid(0)
    assert out["val"]["acc"] == 1.0
    assert out["val"]["loss"] < 0.2
    assert last["rewards_chosen_mean"] > last["rewards_rejected_mean"]
    run = Path(out["log_dir"])
    assert (run / "hf_export" / "model.safetensors").is_file()
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert any(r.get("val/acc") for r in rows) and any(r.get("train/loss") for r in rows)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def _policy(fabric, model_dir, **model_overrides):
    from nemo_aligner.models.hf_causal_lm import HFCausalLM

    cfg = OmegaConf.create({
        "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.98], "sched": {}},
        "peft": {"peft_scheme": "none", "lora_tuning": {"target_modules": ["attention_qkv", "mlp_fc1"], "adapter_dim": 4, "alpha": 8}},
        **model_overrides,
    })
    return HFCausalLM(fabric, cfg, str(model_dir), max_steps=10)


def _batch(tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    pairs = [
        {"prompt_ids": [1] + ids("Human: tea? Assistant:"), "chosen_ids": ids(" yes please") + [2], "rejected_ids": ids(" no") + [2]},
        {"prompt_ids": [1] + ids("Human: rain? Assistant:"), "chosen_ids": ids(" wet") + [2], "rejected_ids": ids(" dry today") + [2]},
    ]
    return collate_preference_pairs(pairs, pad_token_id=0)


def _train_one_step(policy, batch):
    policy.prepare_for_training_step()
    with policy.accumulate(is_last=True):
        loss = -policy.get_logprobs(batch).mean()
        policy.backward(loss)
    policy.finish_training_step()


def _base_logprobs(model_dir, batch):
    from transformers import AutoModelForCausalLM

    from nemo_aligner.models.hf_causal_lm import ResponseLogprobs

    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return ResponseLogprobs(lm)(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col, batch.targets)


@pytest.mark.parametrize("scheme", ["lora", "none"])
def test_reference_is_base_model_and_export_round_trips(tmp_path, tiny_model_dir, tokenizer, scheme):
    fabric = Fabric(accelerator="cpu", devices=1)
    policy = _policy(fabric, tiny_model_dir, peft={"peft_scheme": scheme, "lora_tuning": {"target_modules": ["attention_qkv", "mlp_fc1"], "adapter_dim": 4, "alpha": 8}})
    batch = _batch(tokenizer)
    base = _base_logprobs(tiny_model_dir, batch)
    for _ in range(3):
        _train_one_step(policy, batch)
    with policy.inference():
        trained = policy.get_logprobs(batch)
        reference = policy.get_logprobs(batch, reference=True)
    assert torch.allclose(reference, base, atol=1e-5)  # adapters off (LoRA) / frozen copy (full) == base model
    assert not torch.allclose(trained, base, atol=1e-3)  # training moved the policy
    if scheme == "lora":
        trainable, total = policy.num_trainable_parameters()
        assert trainable < total / 5

    # checkpoint round trip: a fresh model restored from it gives the trained log-probs
    policy.save_checkpoint(str(tmp_path / "ckpt"), {"step": 3})
    restored = _policy(fabric, tiny_model_dir, peft={"peft_scheme": scheme, "lora_tuning": {"target_modules": ["attention_qkv", "mlp_fc1"], "adapter_dim": 4, "alpha": 8}})
    assert restored.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 3}
    with restored.inference():
        assert torch.allclose(restored.get_logprobs(batch), trained, atol=1e-6)

    export = tmp_path / "export"
    policy.export_hf(str(export))
    reloaded = _base_logprobs(export, batch)
    assert torch.allclose(reloaded, trained, atol=1e-4)
    assert (Path(f"{export}_adapter") / "adapter_config.json").is_file() == (scheme == "lora")


def test_unknown_key_is_an_error(tmp_path, tiny_model_dir, dpo_script):
    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = dpo_cfg(tmp_path, tiny_model_dir, data, data, "++trainer.dpo.max_epoch=2")
    with pytest.raises(ConfigKeyError, match=r"trainer\.dpo\.max_epoch'.*did you mean 'trainer\.dpo\.max_epochs'"):
        dpo_script.run(cfg)


def test_malformed_line_reported_through_the_cli(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl")
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "Human: hi Assistant:", "chosen": " hello"}) + "\n")
    cmd = [sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_dpo.py"),
           f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"model.data.data_prefix.train=[{data}]",
           "model.data.data_prefix.validation=null", f"model.data.cache_dir={tmp_path / 'cache'}",
           f"exp_manager.explicit_log_dir={tmp_path / 'run'}", "trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{data}:9" in proc.stderr and "rejected" in proc.stderr


def _losses_by_step(history):
    return {i: h["loss"] for i, h in enumerate(history)}


def test_kill_and_resume_reproduces_the_loss_sequence(tmp_path, tiny_model_dir, dpo_script):
    data = write_pairs(tmp_path / "pairs.jsonl", n=16)
    common = ["trainer.dpo.max_epochs=2", "trainer.dpo.max_steps=8", "trainer.dpo.val_check_interval=4", "trainer.dpo.save_interval=1",
              "model.global_batch_size=4", "model.micro_batch_size=2", "model.optim.lr=1e-3",
              "model.optim.sched.warmup_steps=2", "exp_manager.checkpoint_callback_params.save_top_k=2",
              "exp_manager.export_hf=false"]
    reference = dpo_script.run(dpo_cfg(tmp_path / "a", tiny_model_dir, data, data, *common))["history"]

    # Run the same job as a separate process and SIGKILL it once step 3's checkpoint is on disk.
    run_dir = tmp_path / "b" / "run"
    cmd = [sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_dpo.py"),
           f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"model.data.data_prefix.train=[{data}]",
           f"model.data.data_prefix.validation=[{data}]", f"model.data.cache_dir={tmp_path / 'b' / 'cache'}",
           f"exp_manager.explicit_log_dir={run_dir}", "trainer.accelerator=cpu", "model.encoder_seq_length=64", *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "step=0000003" / "meta.json").exists():
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert "step=0000003" in done and "step=0000008" not in done, done

    resumed = dpo_script.run(dpo_cfg(tmp_path / "b", tiny_model_dir, data, data, *common))["history"]
    start = 8 - len(resumed)
    assert 3 <= start < 8
    for offset, metrics in enumerate(resumed):
        expected = reference[start + offset]
        assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-5), (start + offset, metrics, expected)
        assert metrics["lr"] == pytest.approx(expected["lr"], rel=1e-6)
    # top-k pruning kept at most save_top_k + the latest checkpoint
    kept = [p for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert 1 <= len(kept) <= 3


def test_precomputed_reference_gives_the_same_losses(tmp_path, tiny_model_dir, dpo_script):
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ["trainer.dpo.max_epochs=3", "trainer.dpo.max_steps=3", "model.global_batch_size=4",
              "model.micro_batch_size=2", "model.optim.lr=1e-3", "exp_manager.export_hf=false"]
    live = dpo_script.run(dpo_cfg(tmp_path / "live", tiny_model_dir, data, data, *common))
    cached = dpo_script.run(dpo_cfg(tmp_path / "cached", tiny_model_dir, data, data, *common,
                                    "model.dpo.precompute_ref_log_probs=true"))
    assert (Path(cached["log_dir"]) / "ref_logprobs" / "ref_logprobs.pt").is_file()
    assert [h["loss"] for h in cached["history"]] == pytest.approx([h["loss"] for h in live["history"]], abs=1e-5)
    assert cached["val"]["loss"] == pytest.approx(live["val"]["loss"], abs=1e-5)


def _csv_losses(run_dir):
    rows = csv.DictReader(open(Path(run_dir) / "csv" / "metrics.csv"))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_two_process_ddp_matches_one_process(tmp_path, tiny_model_dir):
    """Data-parallel over 2 CPU processes (gloo) reproduces the single-process losses for the same global batch."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    base = [sys.executable, str(REPO / "examples/nlp/gpt/train_gpt_dpo.py"),
            f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"model.data.data_prefix.train=[{data}]",
            f"model.data.data_prefix.validation=[{data}]", f"model.data.cache_dir={tmp_path / 'cache'}",
            "trainer.accelerator=cpu", "model.encoder_seq_length=64", "trainer.dpo.max_epochs=3",
            "trainer.dpo.max_steps=3", "model.global_batch_size=4", "model.micro_batch_size=1", "model.optim.lr=1e-3",
            "exp_manager.export_hf=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(base + [f"exp_manager.explicit_log_dir={tmp_path / 'one'}"], capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(base + [f"exp_manager.explicit_log_dir={tmp_path / 'two'}", "trainer.devices=2", "trainer.strategy=ddp"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "2 rank(s)" in ddp.stderr
    one, two = _csv_losses(tmp_path / "one"), _csv_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, abs=1e-5)


def test_adamw_is_fused_on_cpu_and_matches_the_multi_tensor_step():
    """``build_adamw`` picks torch's fused kernel for CPU float parameters; its update equals the default one."""
    from nemo_aligner.models.hf_causal_lm import build_adamw

    torch.manual_seed(0)
    fused_p = torch.nn.Parameter(torch.randn(64))
    plain_p = torch.nn.Parameter(fused_p.detach().clone())
    grad = torch.randn(64)
    fused = build_adamw([fused_p], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8)
    plain = torch.optim.AdamW([plain_p], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(3):
        fused_p.grad, plain_p.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(fused_p.detach(), plain_p.detach(), atol=1e-6, rtol=1e-5)


# ---- dropout (issue 10 item 8) ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dropout_gpt2_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 with the stock dropout 0.1 everywhere (embeddings, residuals, attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=512, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("dropout_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("scheme", ["none", "lora"])
def test_first_dpo_loss_is_log_2_with_a_dropout_model(tmp_path, dropout_gpt2_dir, dpo_script, scheme):
    """Policy == reference at step 1, so the DPO loss is -log sigmoid(0) = log 2 exactly; with the policy's dropout
    on (train mode) against an eval-mode (full) or also-dropped-out (LoRA) reference it was not."""
    import math

    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = dpo_cfg(
        tmp_path, dropout_gpt2_dir, data, data,
        "trainer.dpo.max_steps=1", "trainer.dpo.val_check_interval=0", "trainer.dpo.save_interval=0",
        "model.global_batch_size=8", "model.micro_batch_size=4", "++model.dpo.ref_policy_kl_penalty=1.0",
        f"model.peft.peft_scheme={scheme}", "model.peft.lora_tuning.target_modules=[attention_qkv]",
    )
    out = dpo_script.run(cfg)
    assert out["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the export records the dropout the model was trained with
    exported = json.loads((Path(out["log_dir"]) / "hf_export" / "config.json").read_text())
    assert exported["resid_pdrop"] == exported["attn_pdrop"] == exported["embd_pdrop"] == 0.0


def test_lora_reference_runs_in_eval_mode(tiny_model_dir, tokenizer, monkeypatch):
    """The adapters-off reference is evaluated like the frozen copy: in eval mode, even inside a training step."""
    fabric = Fabric(accelerator="cpu", devices=1)
    policy = _policy(fabric, tiny_model_dir, peft={"peft_scheme": "lora", "lora_tuning": {"target_modules": ["attention_qkv"], "adapter_dim": 4, "alpha": 8}})
    modes = []
    policy._lm.get_output_embeddings().register_forward_hook(lambda m, a, o: modes.append(m.training))
    policy.prepare_for_training_step()
    policy.get_logprobs(_batch(tokenizer), reference=True)
    policy.get_logprobs(_batch(tokenizer))
    assert modes == [False, True] and policy._unwrapped.training

"""Reward models: losses against closed forms, layout invariance, learning, export round trips, scripts."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from omegaconf import OmegaConf

from nemo_aligner.algorithms.reward_model import bradley_terry_loss, ranking_loss, reward_loss_and_metrics
from nemo_aligner.data.chat import tokenize_prompt_response
from nemo_aligner.data.reward_batch import RewardBatch, collate_reward_examples
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.models.reward_model import HFRewardModel, RewardScorer
from nemo_aligner.utils.config import ConfigKeyError

from tests.helpers import REPO, build_tiny_model, compose_config, load_example_script


def softplus(x):
    return math.log1p(math.exp(x))


# ---- losses ------------------------------------------------------------------------------------------------------
def test_bradley_terry_closed_form():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 3.0]))
    # -log sigmoid(d) = log(1 + e^-d)
    assert loss.tolist() == pytest.approx([softplus(-1.0), math.log(2.0), softplus(4.0)], rel=1e-6)


def test_ranking_loss_all_ordered_pairs_closed_form():
    # group 0: 3 responses ranked 0 > 1 > 2; group 1: a tie between 3 and 4, both better than 5; group 2: a pair
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0, 0.0, 0.3, 0.7])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    prefs = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    loss = ranking_loss(rewards, group, prefs, 3)
    g0 = (softplus(-1.0) + softplus(-2.0) + softplus(-1.0)) / 3  # pairs (0,1), (0,2), (1,2): mean over K choose 2
    g1 = (softplus(-0.5) + softplus(-2.0)) / 2  # (3,5), (4,5); the tie (3,4) is no pair
    g2 = softplus(0.4)  # a pair: Bradley-Terry
    assert loss.tolist() == pytest.approx([g0, g1, g2], rel=1e-6)
    assert float(ranking_loss(rewards[6:], torch.tensor([0, 0]), prefs[6:], 1)) == pytest.approx(
        float(bradley_terry_loss(rewards[6:7], rewards[7:8])), rel=1e-6
    )


def test_ranking_loss_rejects_a_group_without_pairs():
    with pytest.raises(ValueError, match=r"groups \[1\]"):
        ranking_loss(torch.zeros(4), torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0.0, 5.0, 5.0]), 2)


def test_metrics_closed_form():
    rewards = torch.tensor([0.0, 1.0, -1.0, 2.0, 3.0], requires_grad=True)
    batch = RewardBatch(
        sequences=None, group=torch.tensor([0, 0, 0, 1, 1]), preferences=torch.tensor([2.0, 1.0, 0.0, 1.0, 0.0]),
        num_groups=2,
    )
    loss, m = reward_loss_and_metrics(rewards, batch)
    g0 = (softplus(1.0) + softplus(-1.0) + softplus(-2.0)) / 3
    assert float(loss) == pytest.approx((g0 + softplus(1.0)) / 2, rel=1e-6)
    assert float(m["acc"]) == pytest.approx((2 / 3 + 0.0) / 2)  # group 0: (0,1) wrong, (0,2), (1,2) right; group 1 wrong
    assert float(m["rewards_chosen_mean"]) == pytest.approx((0.0 + 2.0) / 2)
    assert float(m["rewards_rejected_mean"]) == pytest.approx((-1.0 + 3.0) / 2)
    assert float(m["reward_margin"]) == pytest.approx(((0 - -1) + (2 - 3)) / 2)
    assert float(m["rewards_all_mean"]) == pytest.approx(1.0)
    loss.backward()
    assert rewards.grad is not None and rewards.grad[0] < 0 < rewards.grad[4]  # push chosen up, rejected down


# ---- model -------------------------------------------------------------------------------------------------------
def _cfg(peft="none", lr=1e-3):
    return OmegaConf.create({
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.98], "sched": {}},
        "peft": {"peft_scheme": peft, "lora_tuning": {"target_modules": ["attention_qkv"], "adapter_dim": 4, "alpha": 8}},
    })


def _examples(tokenizer):
    out = []
    for prompt, chosen, rejected in [("Human: tea? Assistant:", " yes please", " no"),
                                     ("Human: rain? Assistant:", " wet", " dry today, the quick brown fox"),
                                     ("Human: bread? Assistant:", " flour", " salt")]:
        p, c = tokenize_prompt_response(prompt, chosen, tokenizer)
        _, r = tokenize_prompt_response(prompt, rejected, tokenizer)
        out.append({"prompt_ids": p, "response_ids": [c, r], "preferences": [1.0, 0.0]})
    return out


@pytest.mark.parametrize("kind, peft", [("llama", "none"), ("gpt2", "lora")])
def test_padded_packed_and_one_at_a_time_agree(tmp_path, tokenizer, kind, peft):
    path = tmp_path / kind
    build_tiny_model(kind, len(tokenizer), seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = HFRewardModel(Fabric(accelerator="cpu", devices=1), _cfg(peft), str(path), max_steps=1)
    examples = _examples(tokenizer)
    with model.inference():
        padded = model.get_rewards(collate_reward_examples(examples, 0).sequences)
        packed_batch = collate_reward_examples(examples, 0, pack=True, max_row_length=64).sequences
        packed = model.get_rewards(packed_batch)
        single = torch.cat([model.get_rewards(collate_sequences([{"input_ids": ex["prompt_ids"] + r}], 0))
                            for ex in examples for r in ex["response_ids"]])
        shared_batch = collate_reward_examples(examples, 0, shared_prefix=True).sequences
        shared = model.get_rewards(shared_batch)
        shared_packed_batch = collate_reward_examples(examples, 0, pack=True, max_row_length=80, shared_prefix=True).sequences
        shared_packed = model.get_rewards(shared_packed_batch)
    assert packed_batch.input_ids.shape[0] < 6  # really packed
    assert shared_batch.input_ids.shape[0] == 3  # one row per pair, prompt once
    assert shared_batch.input_ids.numel() < collate_reward_examples(examples, 0).sequences.input_ids.numel()
    assert shared_packed_batch.input_ids.shape[0] < 3
    assert padded.shape == (6,) and padded.std() > 0
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_packed, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(single, padded, atol=1e-5, rtol=0)


def _train(model, batch, steps):
    for _ in range(steps):
        model.prepare_for_training_step()
        with model.accumulate(is_last=True):
            loss, _ = reward_loss_and_metrics(model.get_rewards(batch.sequences), batch)
            model.backward(loss)
        model.finish_training_step()


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_export_loads_in_plain_transformers_and_in_reward_scorer(tmp_path, tiny_model_dir, tokenizer, peft):
    from transformers import AutoModelForSequenceClassification

    lr = 1e-2 if peft == "lora" else 1e-3
    model = HFRewardModel(Fabric(accelerator="cpu", devices=1), _cfg(peft, lr), str(tiny_model_dir), max_steps=8, max_seq_length=40)
    examples = _examples(tokenizer)
    batch = collate_reward_examples(examples, 0)
    _train(model, batch, 8)
    with model.inference():
        trained = model.get_rewards(batch.sequences)
        _, metrics = reward_loss_and_metrics(trained, batch)
    assert float(metrics["acc"]) == 1.0  # 8 steps separate three pairs
    model.set_standardization(0.25, 2.0)
    model.export_hf(str(tmp_path / "rm"))

    sequences = [ex["prompt_ids"] + r for ex in examples for r in ex["response_ids"]]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        plain = torch.tensor([hf(torch.tensor([s])).logits.item() for s in sequences])
    torch.testing.assert_close(plain, trained, atol=1e-4, rtol=0)  # raw reward, unpadded

    scorer = RewardScorer.from_pretrained(str(tmp_path / "rm"))
    assert scorer.max_seq_length == 40 and (scorer.mean, scorer.std) == (0.25, 2.0)
    expected = ((trained - 0.25) / 2.0).tolist()
    assert scorer.score(sequences, micro_batch_size=4) == pytest.approx(expected, abs=1e-4)
    assert scorer.score(sequences, micro_batch_size=1) == pytest.approx(expected, abs=1e-4)
    assert scorer.encode("Human: tea? Assistant:", " no") == sequences[1]
    with pytest.raises(ValueError, match="more than max_seq_length=40"):
        scorer.score([[5] * 41])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        scorer.score([[5], []])


def test_pad_equal_to_eos_export_matches_plain_transformers(tmp_path, tokenizer):
    """HF reads the rightmost non-pad token; with pad == EOS the export writes pad_token_id=null so a sequence
    ending in EOS is still read at its last token."""
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer
    path = tmp_path / "base"
    build_tiny_model("llama", len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "</s>"
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    model = HFRewardModel(Fabric(accelerator="cpu", devices=1), _cfg(), str(path), max_steps=1)
    assert model.pad_token_id == tok.eos_token_id
    model.export_hf(str(tmp_path / "rm"))
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"] is None
    seq = [1, 40, 41, 42, tok.eos_token_id]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    scorer = RewardScorer.from_pretrained(str(tmp_path / "rm"))
    with torch.no_grad():
        assert hf(torch.tensor([seq])).logits.item() == pytest.approx(scorer.score([seq])[0], abs=1e-5)


# ---- scripts -----------------------------------------------------------------------------------------------------
TOPICS = ["bread", "tea", "rain", "maps", "owls", "jazz", "kites", "salt"]


def write_text_pairs(path: Path) -> Path:
    """NeMo-RLHF consecutive {"text"} records, chosen first; chosen and rejected differ consistently."""
    with open(path, "w") as f:
        for i, topic in enumerate(TOPICS):
            f.write(json.dumps({"text": f"Human: Tell me about {topic}. Assistant: Sure, {topic} is lovely."}) + "\n")
            f.write(json.dumps({"text": f"Human: Tell me about {topic}. Assistant: No. Go away {i}!"}) + "\n")
    return path


def rm_cfg(tmp_path, model_dir, train, val, *overrides):
    return compose_config("training_rm", [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.data_prefix.train=[{train}]",
        f"model.data.data_prefix.validation=[{val}]",
        f"model.data.cache_dir={tmp_path / 'cache'}",
        f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
        "trainer.accelerator=cpu",
        "model.encoder_seq_length=64",
        *overrides,
    ])


@pytest.fixture(scope="module")
def rm_script():
    return load_example_script("train_reward_model")


def test_end_to_end_training_centring_export_and_eval(tmp_path, tiny_model_dir, rm_script, capsys):
    data = write_text_pairs(tmp_path / "pairs.jsonl")
    cfg = rm_cfg(
        tmp_path, tiny_model_dir, data, data,
        "trainer.rm.max_epochs=20", "trainer.rm.max_steps=16", "trainer.rm.val_check_interval=8",
        "trainer.rm.save_interval=16", "model.global_batch_size=8", "model.micro_batch_size=4", "model.optim.lr=1e-3",
        "model.data.pack_sequences=true", "model.reward_standardization.enable=true",
        "model.reward_standardization.std=1.0",  # centring only (the measured std: test_standardization_keeps_...)
    )
    out = rm_script.run(cfg)
    hist = out["history"]
    assert len(hist) == 16
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head gives near-equal rewards
    assert out["val"]["acc"] == 1.0 and out["val"]["loss"] < 0.2
    assert out["val"]["reward_margin"] > 1.0
    run = Path(out["log_dir"])
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step=0000016" / "state.pt").is_file()

    # centring: the stored shift is the mean raw reward of the training responses, so they now average ~0
    mean = out["reward_standardization"]["mean"]
    assert mean == pytest.approx(out["val"]["rewards_all_mean"], abs=1e-4)  # val data == train data here
    scorer = RewardScorer.from_pretrained(str(run / "hf_export"))
    assert scorer.mean == pytest.approx(mean)
    texts = [json.loads(line)["text"] for line in open(data)]
    seqs = [tokenizer_ids + [scorer.tokenizer.eos_token_id] for tokenizer_ids in
            (list(scorer.tokenizer(t)["input_ids"]) for t in texts)]
    scores = scorer.score(seqs)
    assert abs(sum(scores) / len(scores)) < 1e-3
    assert all(scores[2 * i] > scores[2 * i + 1] for i in range(len(TOPICS)))

    # the eval script gives the same accuracy for the export and for the checkpoint
    evaluate = load_example_script("eval_reward_model")
    for target in (run / "hf_export", run / "checkpoints" / "step=0000016"):
        summary = evaluate.main([str(target), str(data), "--cache-dir", str(tmp_path / "cache"), "--max-seq-length", "64"])
        assert summary["acc"] == 1.0 and summary["num_examples"] == len(TOPICS)
        assert summary["reward_margin"] == pytest.approx(out["val"]["reward_margin"], abs=1e-3)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("acc=1") and "reward_margin=" in printed[-1]


def test_unknown_key_is_an_error(tmp_path, tiny_model_dir, rm_script):
    data = write_text_pairs(tmp_path / "pairs.jsonl")
    cfg = rm_cfg(tmp_path, tiny_model_dir, data, data, "++trainer.rm.max_step=2")
    with pytest.raises(ConfigKeyError, match=r"trainer\.rm\.max_step'.*did you mean 'trainer\.rm\.max_steps'"):
        rm_script.run(cfg)


def test_malformed_line_reported_through_the_cli(tmp_path, tiny_model_dir):
    data = write_text_pairs(tmp_path / "pairs.jsonl")
    with open(data, "a") as f:
        f.write(json.dumps({"text": "an unpaired chosen text"}) + "\n")
    cmd = [sys.executable, str(REPO / "examples/nlp/gpt/train_reward_model.py"),
           f"pretrained_checkpoint.restore_from_path={tiny_model_dir}", f"model.data.data_prefix.train=[{data}]",
           "model.data.data_prefix.validation=null", f"model.data.cache_dir={tmp_path / 'cache'}",
           f"exp_manager.explicit_log_dir={tmp_path / 'run'}", "trainer.accelerator=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"error: {data}:17: field 'text'" in proc.stderr


def test_shared_prefix_scores_ranked_lists_like_separate_sequences(tiny_model_dir, tokenizer):
    """Three responses in one row ``[prompt | r1 | r2 | r3]``: each reward equals its own ``[prompt | r]`` forward."""
    model = HFRewardModel(Fabric(accelerator="cpu", devices=1), _cfg("none"), str(tiny_model_dir), max_steps=1)
    p, r1 = tokenize_prompt_response("Human: best fruit? Assistant:", " apples", tokenizer)
    _, r2 = tokenize_prompt_response("Human: best fruit? Assistant:", " pears, the quick brown fox", tokenizer)
    _, r3 = tokenize_prompt_response("Human: best fruit? Assistant:", " none", tokenizer)
    examples = [{"prompt_ids": p, "response_ids": [r1, r2, r3], "preferences": [2.0, 1.0, 0.0]},
                {"prompt_ids": p[:3], "response_ids": [r3, r1], "preferences": [1.0, 0.0]}]
    with model.inference():
        shared = model.get_rewards(collate_reward_examples(examples, 0, shared_prefix=True).sequences)
        single = torch.cat([model.get_rewards(collate_sequences([{"input_ids": ex["prompt_ids"] + r}], 0))
                            for ex in examples for r in ex["response_ids"]])
    assert shared.shape == (5,) and single.std() > 0
    torch.testing.assert_close(shared, single, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not fit max_row_length"):
        collate_reward_examples(examples, 0, pack=True, max_row_length=8, shared_prefix=True)


def test_standardization_keeps_the_measured_std_in_the_export(tmp_path, tiny_model_dir, rm_script):
    """reward_standardization.enable=true with mean and std unset: the export's config.json stores the measured
    mean and the measured (population) std of the raw training rewards, and RewardScorer's training scores then
    have mean 0 and std 1. A given std is kept instead of the measured one."""
    import statistics

    data = write_text_pairs(tmp_path / "pairs.jsonl")
    common = ["trainer.rm.max_steps=4", "trainer.rm.val_check_interval=4", "trainer.rm.save_interval=4",
              "model.global_batch_size=8", "model.micro_batch_size=4", "model.optim.lr=1e-3",
              "model.reward_standardization.enable=true"]
    out = rm_script.run(rm_cfg(tmp_path, tiny_model_dir, data, data, *common))
    export = Path(out["log_dir"]) / "hf_export"
    stored = json.loads((export / "config.json").read_text())["reward_standardization"]
    assert stored == pytest.approx(out["reward_standardization"])
    scorer = RewardScorer.from_pretrained(str(export))
    texts = [json.loads(line)["text"] for line in open(data)]
    seqs = [list(scorer.tokenizer(t)["input_ids"]) + [scorer.tokenizer.eos_token_id] for t in texts]
    standardised = scorer.score(seqs)
    scorer.mean, scorer.std = 0.0, 1.0
    raw = scorer.score(seqs)
    assert stored["mean"] == pytest.approx(statistics.fmean(raw), abs=1e-5)
    assert stored["std"] == pytest.approx(statistics.pstdev(raw), rel=1e-4)
    assert abs(stored["std"] - 1.0) > 1e-3  # measured, not the old default of 1
    assert statistics.fmean(standardised) == pytest.approx(0.0, abs=1e-4)
    assert statistics.pstdev(standardised) == pytest.approx(1.0, rel=1e-4)

    fixed = rm_script.run(rm_cfg(tmp_path / "fixed", tiny_model_dir, data, data, *common,
                                 "model.reward_standardization.std=2.5"))
    assert fixed["reward_standardization"]["std"] == 2.5
    assert fixed["reward_standardization"]["mean"] == pytest.approx(stored["mean"], abs=1e-5)  # same training

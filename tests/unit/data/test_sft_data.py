"""SFT: assistant-token masks for every data format, the loss against hand computation, packing, caching,
truncation, bad input, and end-to-end training on a tiny model (learning, checkpoint, HF export, exact resume)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_aligner.algorithms.supervised import sft_loss_and_metrics
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.chat import tokenize_prompt_response
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.data.sft import (
    build_sft_dataset,
    parse_sft_record,
    tokenize_sft_example,
    truncate_sequence,
)
from nemo_aligner.models.hf_causal_lm import ResponseLogprobs
from nemo_aligner.utils.config import ConfigKeyError

from tests.helpers import REPO, build_tiny_model, compose_config, load_example_script


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of mask-1 tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def encode(tokenizer, record, chat=False):
    return tokenize_sft_example(parse_sft_record(record, "data.jsonl", 1), tokenizer, chat=chat)


# ---------------------------------------------------------------------------------------------------------------
# Masks: exactly the assistant tokens, per format
# ---------------------------------------------------------------------------------------------------------------


def test_multi_turn_chat_masks_every_assistant_turn_and_nothing_else(tokenizer):
    # The assistant says the same words as the user: a mask found by string search could not tell them apart.
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "two plus two"},
        {"role": "user", "content": "and bread?"},
        {"role": "assistant", "content": "Mix flour."},
    ]}
    ids, mask = encode(tokenizer, record)
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids) == (
        "<|system|>Be brief.</s><|user|>two plus two</s><|assistant|>two plus two</s>"
        "<|user|>and bread?</s><|assistant|>Mix flour.</s>"
    )
    assert masked_runs(tokenizer, ids, mask) == ["two plus two</s>", "Mix flour.</s>"]


def test_chat_ending_with_a_user_turn_trains_only_on_earlier_assistant_turns(tokenizer):
    record = {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
    ]}
    ids, mask = encode(tokenizer, record)
    assert masked_runs(tokenizer, ids, mask) == ["hello</s>"]
    assert tokenizer.decode(ids).endswith("<|user|>bye</s>") and mask[-1] == 0


def test_nemo_conversations_format(tokenizer):
    record = {
        "system": "You are kind.",
        "conversations": [
            {"from": "User", "value": "Tell me about tea."},
            {"from": "Assistant", "value": "Tea is lovely."},
            {"from": "User", "value": "More?"},
            {"from": "Assistant", "value": "It grows on bushes."},
        ],
        "mask": "User",
        "type": "VALUE_TO_TEXT",
    }
    ids, mask = encode(tokenizer, record)
    assert tokenizer.decode(ids).startswith("<|system|>You are kind.</s><|user|>Tell me about tea.</s>")
    assert masked_runs(tokenizer, ids, mask) == ["Tea is lovely.</s>", "It grows on bushes.</s>"]
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    ids, mask = encode(tokenizer, sharegpt)
    assert masked_runs(tokenizer, ids, mask) == ["yo</s>"]


@pytest.mark.parametrize("record", [
    {"input": "What is two plus two?", "output": " Four."},
    {"prompt": "What is two plus two?", "response": " Four."},
    {"prompt": "What is two plus two?", "completion": " Four."},
    {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."},
])
def test_plain_pairs_train_on_the_response_plus_eos(tokenizer, record):
    ids, mask = encode(tokenizer, record)
    assert tokenizer.decode(ids) == "What is two plus two? Four.</s>"
    assert masked_runs(tokenizer, ids, mask) == [" Four.</s>"]
    prompt_ids, response_ids = tokenize_prompt_response("What is two plus two?", " Four.", tokenizer)
    assert ids == prompt_ids + response_ids  # the same tokens DPO, reward models and PPO see


def test_pair_with_chat_flag_uses_the_chat_template(tokenizer):
    ids, mask = encode(tokenizer, {"input": "Hi", "output": "Hello"}, chat=True)
    assert tokenizer.decode(ids) == "<|user|>Hi</s><|assistant|>Hello</s>"
    assert masked_runs(tokenizer, ids, mask) == ["Hello</s>"]
    as_messages = encode(tokenizer, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    assert (ids, mask) == as_messages


def test_hh_transcript_trains_on_the_last_chosen_response(tokenizer):
    chosen = "\n\nHuman: How do I bake bread?\n\nAssistant: Knead it.\n\nHuman: Then?\n\nAssistant: Bake it."
    ids, mask = encode(tokenizer, {"chosen": chosen, "rejected": chosen[:-9] + " No."})
    assert tokenizer.decode(ids) == chosen + "</s>"
    assert masked_runs(tokenizer, ids, mask) == [" Bake it.</s>"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------

GOOD = {"input": "Hi", "output": "Hello"}


@pytest.mark.parametrize("bad, field", [
    ({"input": "Hi"}, "output"),
    ({"input": "Hi", "output": ""}, "output"),
    ({"input": "Hi", "output": 3}, "output"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages[1]"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Bot", "value": "b"}]}, "conversations[1].from"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}], "mask": "Assistant"}, "mask"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant"}]}, "conversations[1]"),
    ({"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}], "system": 1}, "system"),
    ({"chosen": "\n\nHuman: hi, no assistant turn"}, "chosen"),
    ({"prompt": "hi"}, "response"),
    ({"text": "hi"}, None),
])
def test_malformed_line_names_file_line_and_field(tmp_path, tokenizer, bad, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as info:
        build_sft_dataset(path, tokenizer, 64, cache_dir=tmp_path / "cache")
    err = info.value
    assert (err.line_no, err.field) == (3, field)
    assert str(err).startswith(f"{path}:3: ")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # nothing published


def test_invalid_json_and_missing_chat_template(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: invalid JSON"):
        build_sft_dataset(path, tokenizer, 64, cache_dir=tmp_path / "cache")
    from tests.helpers import build_tokenizer

    plain = build_tokenizer()
    plain.chat_template = None
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: .*no chat template"):
        build_sft_dataset(path, plain, 64, cache_dir=tmp_path / "cache")


def test_chat_template_that_rewrites_earlier_turns_is_an_error(tmp_path, tokenizer):
    from tests.helpers import build_tokenizer

    odd = build_tokenizer()
    odd.chat_template = "{{ messages | length }}" + odd.chat_template  # the prefix changes with every turn
    path = tmp_path / "chat.jsonl"
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(chat) + "\n" + json.dumps({"messages": chat["messages"][::-1]}) + "\n")
    with pytest.raises(DataFormatError, match=r"chat.jsonl:1: .*does not render message 1 as a continuation"):
        build_sft_dataset(path, odd, 64, cache_dir=tmp_path / "cache")
    with pytest.raises(DataFormatError, match=r"chat.jsonl:2: .*starts with an assistant turn"):
        build_sft_dataset(path, tokenizer, 64, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------------
# Truncation and the cache
# ---------------------------------------------------------------------------------------------------------------


def test_truncation_rules():
    ids, mask = [1, 2, 3, 4, 5], [0, 0, 1, 1, 1]
    assert truncate_sequence(ids, mask, 5) == (ids, mask)
    assert truncate_sequence(ids, mask, 4, "truncate", "left") == ([2, 3, 4, 5], [0, 1, 1, 1])
    assert truncate_sequence(ids, mask, 4, "truncate", "right") == ([1, 2, 3, 4], [0, 0, 1, 1])
    assert truncate_sequence(ids, mask, 4, "drop") is None
    assert truncate_sequence(ids, mask, 3, "truncate", "right") == ([1, 2, 3], [0, 0, 1])
    assert truncate_sequence([1, 2, 3, 4], [0, 0, 0, 1], 3, "truncate", "right") is None  # no target left
    assert truncate_sequence([1, 2, 3], [0, 1, 0], 2, "truncate", "left") is None  # a target at position 0 is none
    with pytest.raises(ValueError, match="truncation_method"):
        truncate_sequence(ids, mask, 4, "truncate", "middle")
    with pytest.raises(ValueError, match="truncation"):
        truncate_sequence(ids, mask, 4, "cut")


def test_cache_is_reused_and_keyed_on_settings(tmp_path, tokenizer, monkeypatch):
    import nemo_aligner.data.sft as sft

    path = tmp_path / "train.jsonl"
    rows = [{"input": "What is two plus two? " * k, "output": f" {k} four."} for k in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full, stats = build_sft_dataset(path, tokenizer, 512, cache_dir=tmp_path / "cache")
    assert (stats["num_lines"], stats["num_examples"], stats["num_truncated"], stats["num_dropped"]) == (5, 5, 0, 0)
    assert list(full["line_no"]) == [1, 2, 3, 4, 5]
    ids, mask = encode(tokenizer, rows[2])
    assert list(full[2]["input_ids"]) == ids and list(full[2]["loss_mask"]) == mask

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenised although the cache is valid")
        yield

    monkeypatch.setattr(sft, "_generate_rows", boom)
    again, stats2 = build_sft_dataset(path, tokenizer, 512, cache_dir=tmp_path / "cache")
    assert stats2["cache_path"] == stats["cache_path"] and len(again) == 5
    monkeypatch.undo()

    limit = len(ids) - 1  # rows 3, 4, 5 are longer than this
    lengths = [len(r) for r in full["input_ids"]]
    dropped, dstats = build_sft_dataset(path, tokenizer, limit, truncation="drop", cache_dir=tmp_path / "cache")
    assert dstats["cache_path"] != stats["cache_path"]
    assert dstats["num_dropped"] == sum(n > limit for n in lengths) and len(dropped) == sum(n <= limit for n in lengths)
    cut, cstats = build_sft_dataset(path, tokenizer, limit, cache_dir=tmp_path / "cache")
    assert cstats["num_truncated"] == sum(n > limit for n in lengths) and len(cut) == 5
    assert all(len(r) <= limit for r in cut["input_ids"])
    assert list(cut[4]["loss_mask"])[-3:] == [1, 1, 1]  # left truncation keeps the response


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------


def test_loss_is_the_token_mean_nll_closed_form():
    batch = collate_sequences(
        [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [0, 1]}], pad_token_id=0
    )
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.125]))  # targets 6, 7 | 9
    loss, metrics = sft_loss_and_metrics(logprobs, batch)
    assert loss.item() == pytest.approx((1 + 2 + 3) * math.log(2) / 3)  # token mean, not a mean of sequence means
    assert metrics["loss"].item() == pytest.approx(2 * math.log(2))
    assert metrics["target_tokens"].item() == 3 and metrics["num_sequences"].item() == 2
    assert metrics["target_fraction"].item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="one per target token"):
        sft_loss_and_metrics(logprobs[:2], batch)


def _examples(tokenizer):
    records = [
        {"messages": [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"},
                      {"role": "user", "content": "bread?"}, {"role": "assistant", "content": "Mix flour and bake."}]},
        {"input": "Tell me something rude.", "output": " I would rather not."},
        {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog"},
    ]
    return [dict(zip(("input_ids", "loss_mask"), encode(tokenizer, r)), index=i) for i, r in enumerate(records)]


def test_model_loss_matches_a_hand_computed_nll(tokenizer):
    lm = build_tiny_model("llama", len(tokenizer), seed=3).eval()
    examples = _examples(tokenizer)
    batch = collate_sequences(examples, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        loss, metrics = sft_loss_and_metrics(ResponseLogprobs(lm)(
            batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col, batch.targets
        ), batch)
        total, count = 0.0, 0
        for ex in examples:  # one sequence at a time, full-vocabulary softmax, sum over masked next tokens
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(lm(ids).logits[0].double(), dim=-1)
            for t in range(1, len(ex["input_ids"])):
                if ex["loss_mask"][t]:
                    total -= logp[t - 1, ex["input_ids"][t]].item()
                    count += 1
    assert metrics["target_tokens"].item() == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_packing_gives_the_same_loss_as_padding(tokenizer):
    lm = build_tiny_model("llama", len(tokenizer), seed=4).eval()
    examples = _examples(tokenizer)
    head = ResponseLogprobs(lm)
    losses = []
    for pack in (False, True):
        capacity = sum(len(ex["input_ids"]) for ex in examples)
        batch = collate_sequences(examples, tokenizer.pad_token_id, pack=pack, max_row_length=capacity)
        assert batch.input_ids.shape[0] == (1 if pack else 3)
        with torch.no_grad():
            logprobs = head(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_row, batch.pred_col,
                            batch.targets)
        losses.append(sft_loss_and_metrics(logprobs, batch)[0].item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


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

"""The data layer's shared rules (nemo_aligner.data.chat) and its module layout: every reader applies the same chat,
transcript and tokenisation rules through public names, and each batch layout has its own module."""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import importlib.util
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, SHARED_DATA
from nemo_aligner.data import chat, preference, prompts, reward, sft
from nemo_aligner.data.chat import (
    CHAT_ROLES,
    check_messages,
    hh_prompt_end,
    require_turns,
    split_hh_transcript,
    tokenize_pair,
    tokenize_prompt_response,
)
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.preference_batch import PreferenceBatch, collate_preference_pairs
from nemo_aligner.data.reward_batch import RewardBatch, collate_reward_examples
from nemo_aligner.data.sequences import SequenceBatch, TokenLayout, collate_sequences

PACKAGE = REPO / "nemo_aligner"
ERROR = functools.partial(DataFormatError, "data.jsonl", 3)


def _private_imports(path: Path) -> list[str]:
    """``from nemo_aligner.x import _y`` and ``x._y`` on an imported nemo_aligner module, in one file."""
    tree = ast.parse(path.read_text())
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nemo_aligner"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
                elif (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").is_file():
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.startswith("nemo_aligner"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_data_module_imports_a_private_name():
    """The readers share rules through nemo_aligner.data.chat's public names, not each other's ``_x``; and no module
    anywhere in the package reaches into a private name of the data layer."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        hits = _private_imports(path)
        if path.parent.name == "data":
            found += hits
        else:
            found += [h for h in hits if "nemo_aligner.data" in h]
    assert not found, "\n".join(found)


def test_no_data_module_imports_inside_a_function():
    """The shared tokenisation lives below every reader, so none needs a function-local import to reach it."""
    inner = []
    for path in sorted((PACKAGE / "data").glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{path.name}:{n.lineno}" for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)
                          and (n.module or "").startswith("nemo_aligner.data")]
    assert not inner, inner


def _reward_rows(tmp_path, records, tokenizer=None):
    """:func:`~nemo_aligner.data.reward.iter_reward_rows` of ``records`` written to ``tmp_path/f``, with ``{}``
    records as blank lines (so line numbers can be chosen)."""
    path = tmp_path / "f"
    path.write_text("".join((json.dumps(r) if r else "") + "\n" for r in records))
    return reward.iter_reward_rows(path, tokenizer, 64)


def test_every_reader_applies_the_one_role_rule(tmp_path, tokenizer):
    """``"User"``/``"Assistant"`` become the lower-case roles in every reader; ``"robot"`` is refused by each, with
    the field named."""
    messages = [{"role": "User", "content": "hi"}, {"role": "Assistant", "content": "hello"}]
    lower = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert check_messages(messages, "chosen", ERROR) == lower
    assert preference.parse_preference_record({"prompt": messages[:1], "chosen": messages[1:],
                                               "rejected": "no"}, "f", 1).prompt == lower[:1]
    assert sft.parse_sft_record({"messages": messages}, "f", 1).messages == lower
    assert prompts.parse_prompt_record({"messages": messages}, "f", 1) == lower[:1]
    ranked = {"prompt": messages[:1], "responses": [messages[1:], "no"], "scores": [1, 0]}
    row = next(_reward_rows(tmp_path, [ranked], tokenizer))
    assert row["prompt_ids"] == tokenize_prompt_response(lower[:1], lower[1:], tokenizer)[0]
    robot = [{"role": "robot", "content": "hi"}]
    for parse in (
        lambda: preference.parse_preference_record({"prompt": robot, "chosen": "a", "rejected": "b"}, "f", 2),
        lambda: sft.parse_sft_record({"messages": robot}, "f", 2),
        lambda: prompts.parse_prompt_record({"prompt": robot}, "f", 2),
        lambda: next(_reward_rows(tmp_path, [{}, {"prompt": robot, "responses": ["a", "b"], "scores": [1, 0]}])),
    ):
        with pytest.raises(DataFormatError, match=r"f:2: field '(prompt|messages)\[0\]\.role': unknown chat role 'robot'"):
            parse()
    assert CHAT_ROLES == ("system", "user", "assistant")


def test_hh_transcript_rules():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant: sure"
    assert split_hh_transcript(text, "chosen", ERROR) == (text[: -len(" sure")], " sure")
    assert hh_prompt_end(text, "chosen", ERROR) == len(text) - len(" sure")
    with pytest.raises(DataFormatError, match=r"data.jsonl:3: field 'chosen': HH-RLHF transcript has no"):
        split_hh_transcript("\n\nHuman: hi", "chosen", ERROR)
    with pytest.raises(DataFormatError, match="empty response after the last"):
        split_hh_transcript("\n\nHuman: hi\n\nAssistant:", "chosen", ERROR)
    # a prompt file accepts a transcript that ends with the open assistant turn; SFT and DPO need a response
    assert prompts.parse_prompt_record({"chosen": "\n\nHuman: hi\n\nAssistant:"}, "f", 1) == "\n\nHuman: hi\n\nAssistant:"
    with pytest.raises(DataFormatError, match="field 'prompt': missing required field"):
        require_turns({}, "prompt", ERROR)


def test_tokenize_prompt_response_is_the_pair_rule(tokenizer):
    chat_prompt = [{"role": "user", "content": "hi"}]
    for prompt, response in (("Human: hi", " there"), (chat_prompt, "yo"), ([{"role": "system", "content": "Be kind."}, *chat_prompt], [{"role": "assistant", "content": "a"}])):
        p, c, r = tokenize_pair(prompt, response, "other", tokenizer)
        assert tokenize_prompt_response(prompt, response, tokenizer) == (p, c)
        assert preference.tokenize_example(preference.PreferenceExample(prompt, response, "other"), tokenizer) == (p, c, r)


def test_batch_layouts_live_in_their_own_modules():
    """Preference pairs are laid out by data/preference_batch.py, reward-model groups by data/reward_batch.py; the
    formats (preference.py, reward.py) hold no batch layout, and data/packing.py is gone."""
    assert importlib.util.find_spec("nemo_aligner.data.packing") is None
    assert not hasattr(reward, "RewardBatch") and not hasattr(reward, "collate_reward_examples")
    assert not hasattr(preference, "PreferenceBatch")
    assert PreferenceBatch.__module__ == "nemo_aligner.data.preference_batch"
    assert RewardBatch.__module__ == "nemo_aligner.data.reward_batch"
    # both layouts a causal LM reads share one TokenLayout, with its fields first and in the same order
    shared = [f.name for f in fields(TokenLayout)]
    assert [f.name for f in fields(SequenceBatch)][: len(shared)] == shared
    assert [f.name for f in fields(PreferenceBatch)][: len(shared)] == shared
    pairs = collate_preference_pairs([{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]}], 0)
    moved = pairs.to("cpu")
    assert type(moved) is PreferenceBatch and moved.num_pairs == 1 and torch.equal(moved.targets, pairs.targets)
    seqs = collate_sequences([{"input_ids": [1, 5, 6], "prompt_length": 1}], 0).to("cpu")
    assert type(seqs) is SequenceBatch and seqs.targets.tolist() == [5, 6]
    group = collate_reward_examples([{"prompt_ids": [1, 5], "response_ids": [[6], [7, 8]], "preferences": [1, 0]}], 0)
    assert group.to("cpu").sequences.num_sequences == 2


# Token ids of HH-RLHF validation (first 40 records, as transcripts and as chat messages with "User"/"Assistant"
# roles) through the DPO, SFT, reward-model and prompt readers with the tiny tokenizer, as computed before the rules
# moved to data/chat.py: cached datasets stay valid only while these ids (and FORMAT_VERSIONs) do not change.
GOLDEN_IDS_SHA256 = "92f5065447a43996b94b5792e6d9238f822fa9f71e6e5e26996e1960491cdbcf"


def _hh_messages(text: str) -> list[dict]:
    out = []
    for part in text.split("\n\n"):
        if part.startswith("Human:"):
            out.append({"role": "User", "content": part[6:].strip()})
        elif part.startswith("Assistant:"):
            out.append({"role": "Assistant", "content": part[10:].strip()})
        elif out:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + part}
    return out


def _all_ids(tokenizer, tmp_path) -> list:
    path = SHARED_DATA / "validation.jsonl.gz"
    records = [json.loads(line) for line, _ in zip(gzip.open(path, "rt"), range(40))]
    ids, rm_records = [], []
    for i, record in enumerate(records):
        example = preference.parse_preference_record(record, path, i + 1)
        ids.append(preference.tokenize_example(example, tokenizer))
        for flag in (False, True):
            ids.append(sft.tokenize_sft_example(sft.parse_sft_record(record, path, i + 1), tokenizer, chat=flag))
        ids.append(prompts.tokenize_prompt(prompts.parse_prompt_record(record, path, i + 1), tokenizer))
        rm_records += [record, {"instruction": "Q?", "chosen": record["chosen"][-20:], "rejected": "no"}]
        chosen, rejected = _hh_messages(record["chosen"]), _hh_messages(record["rejected"])
        if chosen != rejected and chosen[0] == rejected[0]:
            messages = {"chosen": chosen, "rejected": rejected}
            ids.append(preference.tokenize_example(preference.parse_preference_record(messages, path, i + 1), tokenizer))
            ids.append(sft.tokenize_sft_example(sft.parse_sft_record({"messages": chosen}, path, i + 1), tokenizer))
            ids.append(prompts.tokenize_prompt(prompts.parse_prompt_record(messages, path, i + 1), tokenizer))
            rm_records += [messages, {"prompt": chosen[:1], "ranking": [0, 1, 2],
                                      "responses": [record["chosen"][-30:], chosen[1:2] or "x", "ok"]}]
        if i < 10:
            rm_records += [{"text": record["chosen"]}, {"text": record["rejected"]}]
    rm_path = tmp_path / "rm.jsonl"
    rm_path.write_text("".join(json.dumps(r) + "\n" for r in rm_records))
    ids += [row for row in reward.iter_reward_rows(rm_path, tokenizer, 256)]
    return ids


@pytest.mark.skipif(not (SHARED_DATA / "validation.jsonl.gz").is_file(), reason="no HH-RLHF data")
def test_token_ids_and_format_versions_are_unchanged(tokenizer, tmp_path):
    """Regression guard for the cache: passes before and after the move (same ids, same versions)."""
    digest = hashlib.sha256(json.dumps(_all_ids(tokenizer, tmp_path)).encode()).hexdigest()
    assert digest == GOLDEN_IDS_SHA256
    assert (preference.FORMAT_VERSION, sft.SFT_FORMAT_VERSION, reward.REWARD_FORMAT_VERSION) == (2, 2, 2)

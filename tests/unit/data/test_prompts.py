"""Prompt-file loader: formats, located errors, tokenisation consistent with the preference data."""

from __future__ import annotations

import gzip
import json

import pytest

from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.prompts import load_prompts, parse_prompt_record, tokenize_prompt, tokenize_prompt_example
from nemo_aligner.data.chat import tokenize_prompt_response

from tests.helpers import build_chatml_tokenizer

MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bake bread?"},
    {"role": "assistant", "content": "Mix flour."},
]


def _write(path, records, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_formats(tmp_path):
    path = _write(
        tmp_path / "p.jsonl.gz",
        [
            {"prompt": "plain"},
            {"prompt": MESSAGES[:1]},
            {"messages": MESSAGES},
            {"messages": MESSAGES[:1]},
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "rejected": "x"},
            {"chosen": MESSAGES, "rejected": MESSAGES[:3] + [{"role": "assistant", "content": "no"}]},
            {"chosen": "\n\nHuman: open\n\nAssistant:"},
        ],
        gz=True,
    )
    prompts = load_prompts(path)
    assert [p.prompt for p in prompts] == [
        "plain",
        MESSAGES[:1],
        MESSAGES[:3],
        MESSAGES[:1],
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
        MESSAGES[:3],
        "\n\nHuman: open\n\nAssistant:",
    ]
    assert [p.line_no for p in prompts] == list(range(1, 8))
    assert [p.index for p in prompts] == list(range(7))
    two = load_prompts([path, path], max_prompts=9)
    assert [(p.prompt, p.line_no, p.index) for p in two[7:]] == [("plain", 1, 7), (MESSAGES[:1], 2, 8)]
    assert len(load_prompts(path, max_prompts=2)) == 2


@pytest.mark.parametrize(
    "record, field, words",
    [
        ({"prompt": 3}, "prompt", "expected a string"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": [{"role": "user"}]}, "prompt[0]", "string 'role' and 'content'"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "no messages before"),
        ({"chosen": "no turns here"}, "chosen", "no '\\n\\nAssistant:' turn"),
        ({"text": "x"}, None, "unrecognised prompt record"),
    ],
)
def test_errors_name_file_line_field(tmp_path, record, field, words):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "fine"}, "", record])
    with pytest.raises(DataFormatError) as info:
        load_prompts(path)
    err = info.value
    assert (err.line_no, err.field) == (3, field)
    assert str(err).startswith(f"{path}:3: ")
    assert words in str(err)


def test_bad_json_and_missing_file(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "ok"}, "{not json"])
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: invalid JSON"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(_write(tmp_path / "empty.jsonl", []))


def test_tokenisation_matches_preference_rules(tokenizer):
    for prompt in ("\n\nHuman: How do I bake bread?\n\nAssistant:", MESSAGES[:3]):
        expected, _ = tokenize_prompt_response(prompt, " Mix flour.", tokenizer)
        assert tokenize_prompt(prompt, tokenizer) == expected


def test_tokenize_example_truncates_left_and_locates_errors(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "the quick brown fox jumps over the lazy dog"}, {"prompt": MESSAGES[:1]}])
    first, second = load_prompts(path)
    full, truncated = tokenize_prompt_example(first, tokenizer)
    assert not truncated and len(full) > 4
    cut, truncated = tokenize_prompt_example(first, tokenizer, max_length=4)
    assert truncated and cut == full[-4:]
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: field 'prompt': .*chat template"):
        tokenize_prompt_example(second, tok)  # same vocabulary, no chat template


def test_prompt_token_budget_is_capped_by_the_reward_model():
    """Online runs keep prompts to min(encoder_seq_length, RM max_seq_length) - response tokens (PPO and RS)."""
    from nemo_aligner.data.prompts import prompt_token_budget

    assert prompt_token_budget(1024, 64) == 960  # no reward-model limit (programmatic reward)
    assert prompt_token_budget(1024, 64, 256) == 192  # an RM export with max_seq_length 256
    assert prompt_token_budget(128, 64, 256) == 64  # the policy's limit is the smaller one
    with pytest.raises(ValueError, match="no room for a prompt"):
        prompt_token_budget(1024, 256, 256)


def test_load_prompt_ids_keeps_the_last_tokens(tokenizer, tmp_path):
    from nemo_aligner.data.prompts import load_prompt_ids

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b c d e f g h i j k l"}\n{"prompt": "hi"}\n{"prompt": "third"}\n')
    full, cut = load_prompt_ids([str(path)], tokenizer, 10_000)
    assert cut == 0 and len(full) == 3
    ids, cut = load_prompt_ids(str(path), tokenizer, 3, max_prompts=2)
    assert len(ids) == 2 and cut == 1
    assert ids[0] == full[0][-3:] and ids[1] == full[1][-3:]


# ---------------------------------------------------------------------------------------------------------------
# the sequence a reward model scores: the chat template's end-of-turn suffix (ChatML: <|im_end|> then "\n")
# ---------------------------------------------------------------------------------------------------------------
def _check_scored_sequence_is_the_rm_training_sequence(tokenizer):
    """For a chat prompt, a rollout that stopped at the end-of-turn token is scored as exactly the prompt + response
    tokens reward-model data gives that conversation; truncated rollouts and plain-text prompts are scored as they
    are. Returns the rule."""
    from nemo_aligner.algorithms.online import score_rewards
    from nemo_aligner.data.prompts import end_of_turn_rule
    from nemo_aligner.data.rollouts import Rollouts

    rule = end_of_turn_rule(tokenizer)
    assert rule is not None and rule.end_id == tokenizer.eos_token_id
    assert rule.suffix_ids == tuple(tokenizer("\n", add_special_tokens=False)["input_ids"])
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    rm_prompt, rm_response = tokenize_prompt_response(messages, "Mix flour and water.", tokenizer)
    assert tokenize_prompt(messages, tokenizer) == rm_prompt  # PPO / RS prompts are RM-data prompts
    # the reward model was trained reading at the last token of rm_prompt + rm_response: "\n" after <|im_end|>
    assert rm_response[-len(rule.suffix_ids) - 1] == tokenizer.eos_token_id
    generated = rm_response[: len(rm_response) - len(rule.suffix_ids)]  # a rollout stops at <|im_end|> (EOS)
    assert generated[-1] == tokenizer.eos_token_id
    plain_prompt = tokenize_prompt("Human: hi", tokenizer)
    rollouts = Rollouts.from_lists(
        [rm_prompt, rm_prompt, plain_prompt],  # plain text: RM data is text + EOS
        [generated, generated[:-1], generated],  # the second was cut at max_length
        ended=[True, False, True],
    )
    seen = []

    def reward_fn(prompt_ids, response_ids):
        seen.extend(list(p) + list(r) for p, r in zip(prompt_ids, response_ids))
        return [float(len(r)) for r in response_ids]

    rewards = score_rewards(reward_fn, rollouts, micro_batch_size=2, end_of_turn=rule)
    assert seen[0] == rm_prompt + rm_response
    assert seen[1] == rm_prompt + generated[:-1]
    assert seen[2] == plain_prompt + generated
    assert rewards == [len(rm_response), len(generated) - 1, len(generated)]
    assert rollouts.rewards.tolist() == rewards and str(rollouts.rewards.dtype) == "torch.float64"
    assert rollouts.responses()[0] == generated  # what the policy and the critic train on is unchanged
    return rule


def test_ended_chat_rollout_is_scored_with_the_end_of_turn_suffix_tiny_chatml():
    _check_scored_sequence_is_the_rm_training_sequence(build_chatml_tokenizer())


@pytest.mark.slow
def test_ended_chat_rollout_is_scored_with_the_end_of_turn_suffix_smollm2():
    """The same with SmolLM2-135M-Instruct's own template (``<|im_end|>`` = EOS = id 2, then ``\\n`` = id 198)."""
    from nemo_aligner.models.hf_causal_lm import load_tokenizer
    from nemo_aligner.models.pretrained import resolve_pretrained

    rule = _check_scored_sequence_is_the_rm_training_sequence(load_tokenizer(resolve_pretrained("smollm2-135m-instruct")))
    assert (rule.end_id, rule.suffix_ids) == (2, (198,))


def _check_end_string_rollouts_are_scored_as_rm_data(tokenizer):
    """A rollout stopped at an end string (HH-RLHF's "\n\nHuman:") keeps those tokens in its response, but the
    reward model was trained on ``response + EOS`` (plain-text transcripts) or ``content <|im_end|> \n`` (chat): it
    is scored on exactly those tokens, not read at the ":" of "Human:". Truncated and EOS-ended rollouts are scored as
    they are."""
    from nemo_aligner.algorithms.online import score_rewards
    from nemo_aligner.data.chat import tokenize_pair
    from nemo_aligner.data.prompts import end_of_turn_rule, end_string_close
    from nemo_aligner.data.rollouts import Rollouts

    end = "\n\nHuman:"
    # reward-model data for an HH-RLHF pair: prompt text + response text + EOS
    rm_prompt, rm_chosen, _ = tokenize_pair("\n\nHuman: hi\n\nAssistant:", " Hello there.", " No.", tokenizer)
    assert rm_chosen[-1] == tokenizer.eos_token_id
    body = rm_chosen[:-1]
    stopped = body + tokenizer(end, add_special_tokens=False)["input_ids"]  # what the engine returns
    assert tokenizer.decode(stopped).endswith(end)
    messages = [{"role": "user", "content": "hi"}]
    chat_prompt, chat_response = tokenize_prompt_response(messages, "Hello there.", tokenizer)
    chat_body = chat_response[: chat_response.index(tokenizer.eos_token_id)]
    rollouts = Rollouts.from_lists(
        [rm_prompt, rm_prompt, rm_prompt, chat_prompt],
        [stopped, stopped, rm_chosen, chat_body + tokenizer(end, add_special_tokens=False)["input_ids"]],
        ended=[True, False, True, True],  # the second was cut at max_length right after "Human:"
    )
    seen = []

    def reward_fn(prompt_ids, response_ids):
        seen.extend(list(p) + list(r) for p, r in zip(prompt_ids, response_ids))
        return [0.0] * len(response_ids)

    close = end_string_close(tokenizer, [end])
    score_rewards(reward_fn, rollouts, end_of_turn=end_of_turn_rule(tokenizer), end_string=close)
    assert seen[0] == rm_prompt + rm_chosen  # the RM-data sequence of this response
    assert seen[1] == rm_prompt + stopped  # truncated: as it is
    assert seen[2] == rm_prompt + rm_chosen  # ended at EOS: already RM data
    assert seen[3] == chat_prompt + chat_response  # chat: <|im_end|> and the suffix
    assert rollouts.responses()[0] == stopped  # the policy and the critic train on what was generated
    assert close.strip(body) is None  # no end string: nothing to strip


def test_rollouts_stopped_at_an_end_string_are_scored_as_reward_model_data_tiny_chatml():
    _check_end_string_rollouts_are_scored_as_rm_data(build_chatml_tokenizer())


@pytest.mark.slow
def test_rollouts_stopped_at_an_end_string_are_scored_as_reward_model_data_smollm2():
    from nemo_aligner.models.hf_causal_lm import load_tokenizer
    from nemo_aligner.models.pretrained import resolve_pretrained

    _check_end_string_rollouts_are_scored_as_rm_data(load_tokenizer(resolve_pretrained("smollm2-135m-instruct")))


def test_an_end_string_merged_into_a_token_with_text_is_stripped_with_that_token():
    """When the end string's first characters share a token with the response text, that token goes too (the
    shortest tail that spells the end string), and the rest of the response is kept."""
    from nemo_aligner.data.prompts import EndStringClose

    class CharTokenizer:  # token i decodes to PIECES[i]
        PIECES = ["Sure", ".\n", "\nHu", "man:", "x"]

        def decode(self, ids, **kwargs):
            return "".join(self.PIECES[i] for i in ids)

    close = EndStringClose(("\n\nHuman:",), 99, CharTokenizer())
    assert close.strip([0, 1, 2, 3]) == [0]
    assert close.scored_response([7], [0, 1, 2, 3], ended=True) == [0, 99]
    assert close.scored_response([7], [0, 1, 2, 3], ended=False) is None
    assert close.strip([0, 1, 2, 3, 4]) is None


def test_templates_that_end_the_turn_at_eos_need_no_suffix(tokenizer):
    """The test tokenizer's template closes a turn with ``</s>`` = EOS and nothing after it: rollouts are scored
    where they stop (no rule); a tokenizer without a chat template has none either."""
    from nemo_aligner.data.prompts import end_of_turn_rule

    assert end_of_turn_rule(tokenizer) is None
    chatml = build_chatml_tokenizer()
    chatml.chat_template = None
    assert end_of_turn_rule(chatml) is None


def test_prompt_budget_reserves_the_scored_suffix():
    """prompt + response + suffix must fit the reward model: min(1024, 256 - 1) - 64 = 191."""
    from nemo_aligner.data.prompts import prompt_token_budget

    assert prompt_token_budget(1024, 64, 256) == 192
    assert prompt_token_budget(1024, 64, 256, scored_suffix_tokens=1) == 191
    assert prompt_token_budget(128, 64, 256, scored_suffix_tokens=1) == 64  # the policy's limit binds
    assert prompt_token_budget(128, 64, None, scored_suffix_tokens=1) == 64

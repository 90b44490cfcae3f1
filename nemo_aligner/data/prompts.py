"""Prompt files (PPO, rejection sampling, generation): parsing, located errors and tokenisation.

Accepted JSON-lines records (plain ``.jsonl`` or ``.jsonl.gz``), detected from the keys in this order:

* ``{"prompt": str}`` or ``{"prompt": [chat messages]}``;
* ``{"messages": [chat messages]}``: the prompt is the messages before the last assistant turn (all of them when
  there is no assistant turn), as in chat SFT data;
* Anthropic HH-RLHF / preference data ``{"chosen": str, ...}``: the transcript up to and including its last
  ``"\\n\\nAssistant:"``; ``{"chosen": [chat messages], ...}``: the messages before the last assistant turn.

Other keys are ignored. Prompts are tokenised with the rules of
:func:`nemo_aligner.data.chat.tokenize_prompt_response` (chat template with a generation prompt for messages;
the tokenizer's special tokens, e.g. BOS, for plain text), so a policy sees the same prompt tokens in DPO, PPO and
rejection sampling.

Where an online run scores a response: :func:`end_of_turn_rule` reads from the chat template what the reward-model
training tokenisation puts after the end-of-turn token of an assistant turn (ChatML: ``<|im_end|>`` then ``\n``), so
that a rollout that stopped at that token is scored with the same tokens, at the position the reward head was trained
on (:meth:`EndOfTurn.scored_response`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from nemo_aligner.data.jsonl import DataFormatError, iter_jsonl
from nemo_aligner.utils.config import ConfigValueError, as_list
from nemo_aligner.data.chat import (
    HH_ASSISTANT,
    Turns,
    check_messages,
    encode,
    has_chat_template,
    hh_prompt_end,
    render_chat,
    require_chat_template,
    require_turns,
    tokenize_prompt_response,
)

ACCEPTED_PROMPT_FORMATS = (
    "{'prompt': str or [chat messages]}",
    "{'messages': [chat messages]} (prompt = the messages before the last assistant turn)",
    "HH-RLHF / preference data {'chosen': transcript str or [chat messages], ...} "
    f"(prompt = the transcript up to its last {HH_ASSISTANT!r})",
)


@dataclass
class PromptExample:
    """One prompt of a prompt file.

    Attributes:
        prompt: plain text, or chat messages (``{"role", "content"}`` dicts).
        path: the file it comes from; line_no: its 1-based line there (for error messages).
        index: 0-based position among the prompts read (across all files, in order).
    """

    prompt: Turns
    path: str
    line_no: int
    index: int


def _before_last_assistant(messages: list, field: str, error) -> list:
    messages = check_messages(messages, field, error)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    prompt = messages[:last]
    if not prompt:
        raise error(field, "no messages before the last assistant turn, so there is no prompt")
    return prompt


def parse_prompt_record(record: dict, path: str | os.PathLike, line_no: int) -> Turns:
    """The prompt of one JSON record (see the module docstring for the formats).

    Raises:
        DataFormatError: naming ``path:line_no`` and the field: an empty, whitespace-only or wrongly typed prompt,
            a malformed chat message or one whose role is not system, user or assistant (any capitalisation; see
            :func:`~nemo_aligner.data.chat.check_messages`), an HH-RLHF transcript without an
            ``"\\n\\nAssistant:"`` turn, or an unknown format (the message lists the accepted ones).
    """
    error = functools.partial(DataFormatError, path, line_no)
    if "prompt" in record:
        prompt = require_turns(record, "prompt", error)
        if isinstance(prompt, str) and not prompt.strip():
            raise error("prompt", f"the prompt is only whitespace ({prompt!r:.40}); give the prompt text or remove "
                                  "the line")
        return prompt
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise error("messages", f"expected a list of chat messages, got {type(messages).__name__}")
        return _before_last_assistant(messages, "messages", error)
    if "chosen" in record:
        chosen = record["chosen"]
        if isinstance(chosen, list):
            return _before_last_assistant(chosen, "chosen", error)
        if not isinstance(chosen, str):
            raise error("chosen", f"expected a transcript string or chat messages, got {type(chosen).__name__}")
        return chosen[: hh_prompt_end(chosen, "chosen", error)]  # the whole transcript if it ends with the marker
    accepted = "".join(f"\n  - {fmt}" for fmt in ACCEPTED_PROMPT_FORMATS)
    raise error(None, f"unrecognised prompt record with keys {sorted(record)}; accepted formats:{accepted}")


def iter_prompts(paths: str | os.PathLike | list) -> Iterator[PromptExample]:
    """Stream the prompts of one or more JSON-lines files, in file then line order.

    Raises:
        FileNotFoundError: a missing file (before anything is yielded for it).
        DataFormatError: a file without records (no line), a malformed line (see
            :func:`nemo_aligner.data.jsonl.iter_jsonl` and :func:`parse_prompt_record`).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    index = 0
    for path in paths:
        first = index
        for line_no, record in iter_jsonl(path, allow_empty=True):
            yield PromptExample(parse_prompt_record(record, path, line_no), str(path), line_no, index)
            index += 1
        if index == first:
            message = "no prompts: the file holds no JSON records (it is empty or has only blank lines)"
            raise DataFormatError(path, None, None, message)


def load_prompts(paths: str | os.PathLike | list, max_prompts: int | None = None) -> list[PromptExample]:
    """The first ``max_prompts`` prompts (all when ``None`` or negative) of :func:`iter_prompts`.

    Raises:
        ValueError: no files given. DataFormatError: a file without records (empty), a malformed line; plus what
            :func:`iter_prompts` raises.
    """
    prompts: list[PromptExample] = []
    for example in iter_prompts(paths):
        if max_prompts is not None and 0 <= max_prompts <= len(prompts):
            break
        prompts.append(example)
    if not prompts and not (max_prompts is not None and max_prompts == 0):
        raise ConfigValueError(f"no prompt files given ({paths!r})")
    return prompts


def tokenize_prompt(prompt: Turns, tokenizer) -> list[int]:
    """Token ids of a prompt, the ``prompt_ids`` that :func:`nemo_aligner.data.chat.tokenize_prompt_response`
    gives for it.

    * Chat messages: ``apply_chat_template(messages, add_generation_prompt=True)`` tokenised without special tokens
      (the template writes them).
    * Plain text: ``tokenizer(prompt)`` with the tokenizer's special tokens (e.g. BOS).

    Raises:
        ValueError: messages with a tokenizer that has no chat template, or a prompt that gives no tokens.
    """
    if isinstance(prompt, list):
        require_chat_template(tokenizer, "the prompt is a list of chat messages", "plain-text prompts")
        ids = encode(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)
    else:
        ids = encode(tokenizer, prompt, add_special_tokens=True)
    if not ids:
        raise ValueError("prompt gives no tokens")
    return ids


def tokenize_prompt_example(example: PromptExample, tokenizer, max_length: int | None = None) -> tuple[list[int], bool]:
    """:func:`tokenize_prompt` of ``example``, keeping the LAST ``max_length`` tokens when longer (the end holds the
    open assistant turn). Returns ``(ids, truncated)``.

    Raises:
        DataFormatError: naming the example's file, line and the ``prompt`` field, for what :func:`tokenize_prompt`
            rejects.
    """
    try:
        ids = tokenize_prompt(example.prompt, tokenizer)
    except ValueError as err:
        raise DataFormatError(example.path, example.line_no, "prompt", str(err)) from None
    if max_length is not None and 0 < max_length < len(ids):
        return ids[-max_length:], True
    return ids, False


def load_prompt_ids(paths, tokenizer, max_prompt_tokens: int,
                    max_prompts: int | None = None) -> tuple[list[list[int]], int]:
    """Token ids of the first ``max_prompts`` prompts (all when ``None``) of ``paths`` (a path, a list of paths or
    a Hydra ``ListConfig``), each kept to its last ``max_prompt_tokens`` tokens (:func:`tokenize_prompt_example`),
    and how many were cut.

    Raises:
        FileNotFoundError, DataFormatError, ValueError: as :func:`load_prompts` and :func:`tokenize_prompt_example`.
    """
    ids, cut = [], 0
    for example in load_prompts(as_list(paths), None if max_prompts is None else int(max_prompts)):
        tokens, truncated = tokenize_prompt_example(example, tokenizer, max_prompt_tokens)
        ids.append(tokens)
        cut += int(truncated)
    return ids, cut


def prompt_token_budget(encoder_seq_length: int, max_response_tokens: int,
                        reward_model_max_seq_length: int | None = None, scored_suffix_tokens: int = 0) -> int:
    """The most prompt tokens an online run (PPO, rejection sampling) may keep, so that every prompt + response fits
    the policy and the reward model: ``min(encoder_seq_length, reward_model_max_seq_length - scored_suffix_tokens)
    - max_response_tokens`` (the reward model's limit only when given). ``scored_suffix_tokens`` is the length of
    the end-of-turn suffix the reward model also reads (``len(EndOfTurn.suffix_ids)``, see :func:`end_of_turn_rule`).

    Raises:
        ValueError: no room is left for a prompt (the budget is < 1).
    """
    seq_len = int(encoder_seq_length)
    if reward_model_max_seq_length is not None:
        rm_len = int(reward_model_max_seq_length) - max(int(scored_suffix_tokens), 0)
        seq_len = min(seq_len, rm_len)  # every prompt + response (+ the scored suffix) must fit the reward model too
    budget = seq_len - int(max_response_tokens)
    if budget < 1:
        raise ConfigValueError(f"a sequence limit of {seq_len} tokens (model.encoder_seq_length, or the reward model's "
                               f"max_seq_length when smaller) leaves no room for a prompt next to "
                               f"length_params.max_length={max_response_tokens}")
    return budget


def load_train_val_prompt_ids(data_cfg, tokenizer,
                              max_prompt_tokens: int) -> tuple[list[list[int]], list[list[int]], int]:
    """The training and validation prompts of an online run's ``model.data`` section (``data_prefix.train``,
    ``data_prefix.validation`` (may be empty), ``max_prompts``, ``max_val_prompts``) as :func:`load_prompt_ids`
    gives them. Returns ``(train_ids, val_ids, training prompts cut to max_prompt_tokens)``.

    Raises:
        FileNotFoundError, DataFormatError, ValueError: as :func:`load_prompt_ids`.
    """
    train, cut = load_prompt_ids(data_cfg.data_prefix.train, tokenizer, max_prompt_tokens, data_cfg.get("max_prompts"))
    val: list[list[int]] = []
    if as_list(data_cfg.data_prefix.get("validation")):
        val, _ = load_prompt_ids(data_cfg.data_prefix.validation, tokenizer, max_prompt_tokens,
                                 data_cfg.get("max_val_prompts"))
    return train, val, cut


# ---------------------------------------------------------------------------------------------------------------
# the sequence a reward model scores
# ---------------------------------------------------------------------------------------------------------------
#: The probe conversations :func:`end_of_turn_rule` renders (two, so a suffix that depends on the content is caught).
_PROBES = (([{"role": "user", "content": "Hi"}], "Hello there."), ([{"role": "user", "content": "2+2?"}], "4"))


@dataclass(frozen=True)
class EndOfTurn:
    """How a chat template closes an assistant turn, as the reward-model training tokenisation
    (:func:`nemo_aligner.data.chat.tokenize_prompt_response`) writes it.

    A chat response is ``content + end_id + suffix_ids`` there (ChatML, e.g. SmolLM2: ``... <|im_end|> \\n``), so a
    reward model trained on chat comparisons reads its reward at the last suffix token. A rollout stops at
    ``end_id`` (an EOS / stop token); :meth:`scored_response` appends ``suffix_ids`` so that it is scored at the
    same position.

    Attributes:
        end_id: the token that ends an assistant turn (a stop token of generation).
        suffix_ids: the tokens the template writes after it (non-empty).
        generation_prompt_ids: the tokens a chat prompt ends with (the template's generation prompt, e.g.
            ``<|im_start|>assistant\\n``; when the template has none, the close of the previous turn,
            ``end_id + suffix_ids``): only a response to such a prompt gets the suffix. A plain-text prompt's
            response is tokenised ``text + EOS`` in reward-model data and is scored as it is.
    """

    end_id: int
    suffix_ids: tuple[int, ...]
    generation_prompt_ids: tuple[int, ...]

    def is_chat_prompt(self, prompt_ids: Sequence[int]) -> bool:
        """Whether ``prompt_ids`` ends with :attr:`generation_prompt_ids` (a prompt rendered by the chat template)."""
        n = len(self.generation_prompt_ids)
        return len(prompt_ids) >= n and tuple(int(t) for t in prompt_ids[len(prompt_ids) - n :]) == self.generation_prompt_ids

    def scored_response(self, prompt_ids: Sequence[int], response_ids: Sequence[int], ended: bool) -> list[int]:
        """The response tokens a reward model scores for a rollout: ``response_ids + suffix_ids`` when the rollout
        ``ended`` on :attr:`end_id` after a chat prompt (:meth:`is_chat_prompt`), else ``response_ids`` unchanged
        (a truncated response, one stopped by an end string, or a plain-text prompt)."""
        response = [int(t) for t in response_ids]
        if ended and response and response[-1] == self.end_id and self.is_chat_prompt(prompt_ids):
            return response + list(self.suffix_ids)
        return response


def _stop_token_ids(tokenizer, extra: Sequence[int] | None) -> set[int]:
    """EOS, ``extra`` (e.g. a ``generation_config``'s EOS ids) and the tokenizer's special tokens: the candidates for
    the token that closes an assistant turn."""
    ids = {int(t) for t in (extra or []) if t is not None}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(int(t) for t in (getattr(tokenizer, "all_special_ids", None) or []))
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def end_of_turn_rule(tokenizer, stop_token_ids: Sequence[int] | None = None) -> EndOfTurn | None:
    """Read :class:`EndOfTurn` from ``tokenizer``'s chat template, or ``None`` when rollouts need no suffix.

    Two probe conversations (a user turn, an assistant reply) are tokenised as reward-model data is
    (:func:`~nemo_aligner.data.chat.tokenize_prompt_response`); the last stop token of the response (EOS, a
    token of ``stop_token_ids``, or another special token) is the end-of-turn token and what follows it the suffix.

    Returns ``None`` when the tokenizer has no chat template, the response has no such token, or nothing follows it
    (e.g. Llama 3's ``<|eot_id|>``): the reward model then reads where a rollout stops.

    Raises:
        ValueError: the two probes disagree on the end-of-turn token or its suffix (a template whose turn ending
            depends on the content cannot be reproduced from token ids).
    """
    if not has_chat_template(tokenizer):
        return None
    stops = _stop_token_ids(tokenizer, stop_token_ids)
    found = set()
    for messages, reply in _PROBES:
        prompt_ids, response_ids = tokenize_prompt_response(messages, reply, tokenizer)
        last = max((i for i, t in enumerate(response_ids) if int(t) in stops), default=None)
        if last is None:
            found.add(None)
            continue
        nogen = encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False), add_special_tokens=False)
        prompt_ids, nogen = [int(t) for t in prompt_ids], [int(t) for t in nogen]
        gen = tuple(prompt_ids[len(nogen):]) if prompt_ids[: len(nogen)] == nogen else ()
        end, suffix = int(response_ids[last]), tuple(int(t) for t in response_ids[last + 1 :])
        found.add((end, suffix, gen or (end, *suffix)))
    if len(found) != 1:
        raise ValueError(f"the chat template ends assistant turns differently for different replies ({sorted(map(str, found))}); "
                         "the reward model's read position cannot be reproduced for rollouts")
    rule = found.pop()
    if rule is None or not rule[1]:
        return None
    return EndOfTurn(*rule)


@dataclass(frozen=True)
class EndStringClose:
    """How a rollout that stopped at an end string (``sampling_params.end_strings``, e.g. HH-RLHF's
    ``"\\n\\nHuman:"``) is scored: as reward-model data closes a response, not at the end string's last token.

    The engines keep the end string's tokens in the response (``"... Sure.\\n\\nHuman:"``), but the reward model
    was trained on ``response + EOS`` (plain text, :func:`nemo_aligner.data.chat.encode`) or on
    ``content + end_id + suffix`` (a chat turn, :class:`EndOfTurn`) and reads its reward at that last token. So the
    scored response drops the tokens that spell the end string and closes the turn as the data does. Without this,
    the reward of every such rollout is read at the ``":"`` of ``"Human:"``, a position the head never saw in
    training (its values there are arbitrary, and PPO optimises them).

    Attributes:
        end_strings: the strings generation stops at.
        eos_token_id: the token closing a plain-text response (the tokenizer's EOS).
        tokenizer: decodes response tails to find where the end string starts.
    """

    end_strings: tuple[str, ...]
    eos_token_id: int
    tokenizer: object

    def strip(self, response_ids: Sequence[int]) -> list[int] | None:
        """``response_ids`` without the trailing tokens that spell an end string: the longest prefix whose
        remaining tail still decodes to text ending with one (a token that merges text with the end string's first
        characters goes too). ``None`` when the decoded response does not end with an end string."""
        ids = [int(t) for t in response_ids]

        def tail(k: int) -> str:
            return self.tokenizer.decode(ids[k:], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        if not any(tail(0).endswith(s) for s in self.end_strings):
            return None
        for k in range(len(ids) - 1, -1, -1):
            if any(tail(k).endswith(s) for s in self.end_strings):
                return ids[:k]
        return []  # pragma: no cover (k = 0 matched above)

    def scored_response(self, prompt_ids: Sequence[int], response_ids: Sequence[int], ended: bool,
                        end_of_turn: EndOfTurn | None = None) -> list[int] | None:
        """The scored response of a rollout that ``ended`` at an end string: :meth:`strip`, then ``end_id +
        suffix_ids`` after a chat prompt (``end_of_turn``, :meth:`EndOfTurn.is_chat_prompt`), else ``eos_token_id``.
        ``None`` when the rollout did not end at an end string (truncated, or ended at EOS): score it as it is."""
        if not ended:
            return None
        body = self.strip(response_ids)
        if body is None:
            return None
        if end_of_turn is not None and end_of_turn.is_chat_prompt(prompt_ids):
            return body + [end_of_turn.end_id, *end_of_turn.suffix_ids]
        return body + [self.eos_token_id]


def end_string_close(tokenizer, end_strings: Sequence[str] | None, eos_token_id: int | None = None) -> EndStringClose | None:
    """:class:`EndStringClose` for ``end_strings`` (``None`` when there are none or no tokenizer).

    Raises:
        ValueError: end strings with a tokenizer that has no EOS and no ``eos_token_id`` given.
    """
    if not end_strings or tokenizer is None:
        return None
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("end_strings need an EOS token to close the scored responses; the tokenizer has none")
    return EndStringClose(tuple(str(s) for s in end_strings), int(eos), tokenizer)


def scored_response_ids(prompt_ids: Sequence[int], response_ids: Sequence[int], ended: bool,
                        end_of_turn: EndOfTurn | None = None, end_string: EndStringClose | None = None) -> list[int]:
    """The response tokens a reward model scores for one rollout: closed like reward-model data when it stopped at
    an end string (:meth:`EndStringClose.scored_response`), with the chat template's suffix when it ended at the
    end-of-turn token (:meth:`EndOfTurn.scored_response`), else unchanged (a truncated response, or an EOS-ended
    plain-text one, which is ``text + EOS`` as in the data)."""
    if end_string is not None:
        closed = end_string.scored_response(prompt_ids, response_ids, ended, end_of_turn)
        if closed is not None:
            return closed
    if end_of_turn is not None:
        return end_of_turn.scored_response(prompt_ids, response_ids, ended)
    return [int(t) for t in response_ids]

"""The chat, transcript and tokenisation rules every reader of the data layer shares.

The preference (DPO, reward-model pairs), SFT, reward-model and prompt readers, the reward model's scoring of text
and the reward-model server all apply these rules, so that the same record gives the same tokens wherever it is
read:

* **Chat messages** (:func:`check_messages`): ``{"role", "content"}`` objects whose role is one of
  :data:`CHAT_ROLES`, in any capitalisation in data files (NeMo's ``"User"``), lower-cased before rendering.
* **Anthropic HH-RLHF transcripts** (:func:`split_hh_transcript`): ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  strings, split after the last :data:`HH_ASSISTANT` marker.
* **Record fields** (:func:`require_turns`, :func:`check_turns`, :func:`finite_number`): a prompt or response is a
  string or a list of chat messages; a reward or score is a finite float32 number. Errors are built by the caller's
  ``error(field, message)`` (e.g. ``functools.partial(DataFormatError, path, line_no)``), so they name the file,
  line and field.
* **Tokenisation** (:func:`tokenize_pair`, :func:`tokenize_prompt_response`): conversational data is rendered with
  the tokenizer's chat template (:func:`render_chat`) and tokenised without special tokens; plain text gets the
  tokenizer's special tokens (BOS) on the prompt and EOS after each response (:func:`encode`).

Nothing here reads files or builds tensors; the readers (:mod:`nemo_aligner.data.preference`,
:mod:`nemo_aligner.data.sft`, :mod:`nemo_aligner.data.reward`, :mod:`nemo_aligner.data.prompts`) do.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Union

Message = dict[str, Any]
"""A chat message: ``{"role": str, "content": str}`` (extra keys are passed to the chat template)."""

Turns = Union[str, list[Message]]
"""Plain text, or a list of chat messages."""

ErrorFactory = Callable[[Union[str, None], str], Exception]
"""``error(field, message) -> Exception``: builds the located error a rule raises, e.g.
``functools.partial(DataFormatError, path, line_no)``."""

CHAT_ROLES = ("system", "user", "assistant")
"""The chat roles every reader accepts in a message's ``role``; any capitalisation (NeMo's ``"User"``,
``"Assistant"``, ``"System"``) is accepted in data files and becomes the lower-case role. The reward-model server
accepts exactly these strings (it passes messages to the chat template unchanged)."""

HH_ASSISTANT = "\n\nAssistant:"
"""Marker that starts an assistant turn in raw Anthropic HH-RLHF transcripts."""

FLOAT32_MAX = 3.4028234663852886e38
"""Largest finite float32: rewards and scores are stored as float32, so larger magnitudes would become inf."""


# --------------------------------------------------------------------------------------
# Chat messages and record fields
# --------------------------------------------------------------------------------------


def canonical_role(role: str) -> str | None:
    """The role of :data:`CHAT_ROLES` that ``role`` names in any capitalisation (``"User"`` -> ``"user"``), or None
    for any other role."""
    role = role.lower()
    return role if role in CHAT_ROLES else None


def check_messages(messages: list, field: str, error: ErrorFactory) -> list[Message]:
    """Validate a list of chat messages and return it with canonical roles; the one check every reader (preference,
    SFT, reward-model and prompt files) applies to chat messages.

    Each message must be an object with a string ``role`` and a string ``content`` (other keys are kept and passed
    to the chat template). ``role`` must be one of :data:`CHAT_ROLES` in any capitalisation (``"User"`` becomes
    ``"user"``, so the template renders the role it expects; see :func:`canonical_role`).

    Args:
        messages: the decoded JSON list.
        field: its name in the record, e.g. ``"chosen"`` (errors name ``"chosen[2]"`` or ``"chosen[2].role"``).
        error: ``error(field, message) -> Exception``, e.g. ``functools.partial(DataFormatError, path, line_no)``.

    Returns:
        The messages, a new dict for each one whose role was not already lower case.

    Raises:
        what ``error`` builds: a message that is not such an object, or an unknown role (``'robot'``).
    """
    checked = []
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            shown = f"{message!r:.200}"
            raise error(f"{field}[{i}]", f"chat message must be an object with string 'role' and 'content', got {shown}")
        role = canonical_role(message["role"])
        if role is None:
            roles = ", ".join(CHAT_ROLES)
            raise error(f"{field}[{i}].role", f"unknown chat role {message['role']!r:.80}; use one of {roles}")
        checked.append(message if role == message["role"] else {**message, "role": role})
    return checked


def check_turns(value: Any, field: str, error: ErrorFactory, allow_messages: bool = True,
                allow_empty: bool = False) -> Turns:
    """Return ``value`` (a prompt or a response) after checking it is a string, or a list of chat messages when
    ``allow_messages`` (then with canonical roles, :func:`check_messages`).

    Raises:
        what ``error(field, message)`` builds: another type, an empty value (unless ``allow_empty``), or a
        malformed message.
    """
    if isinstance(value, list) and allow_messages:
        value = check_messages(value, field, error)
    elif not isinstance(value, str):
        expected = "a string or a list of chat messages" if allow_messages else "a string"
        raise error(field, f"expected {expected}, got {type(value).__name__}")
    if not value and not allow_empty:
        raise error(field, "must not be empty")
    return value


def require_turns(record: dict, field: str, error: ErrorFactory, allow_messages: bool = True,
                  allow_empty: bool = False) -> Turns:
    """:func:`check_turns` of ``record[field]``.

    Raises:
        what ``error`` builds: ``field`` is missing, plus what :func:`check_turns` raises.
    """
    if field not in record:
        raise error(field, "missing required field")
    return check_turns(record[field], field, error, allow_messages, allow_empty)


def finite_number(value: Any, field: str, error: ErrorFactory) -> float:
    """``float(value)`` of a JSON number that is finite and within float32 range (rewards and scores are stored
    as float32, and a NaN reward would read as "no reward").

    Raises:
        what ``error(field, message)`` builds: a non-number (a bool included), NaN, +-inf (JSON ``NaN`` /
        ``Infinity``, which Python's decoder accepts), or a magnitude above :data:`FLOAT32_MAX` (e.g. an integer
        too large for a float).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(field, f"expected a number, got {value!r:.80}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64; its repr can be too long to print
        number = math.inf
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        shown = repr(value)
        if isinstance(value, int):  # str() of a long int can itself fail (sys.get_int_max_str_digits)
            shown = f"an integer of about {round(value.bit_length() * math.log10(2))} digits"
        raise error(field, f"expected a finite number of magnitude at most {FLOAT32_MAX:.4g} (float32), got {shown}")
    return number


# --------------------------------------------------------------------------------------
# Anthropic HH-RLHF transcripts
# --------------------------------------------------------------------------------------


def hh_prompt_end(text: str, field: str, error: ErrorFactory) -> int:
    """Where the prompt of an HH-RLHF transcript ends: the index just after its last :data:`HH_ASSISTANT` marker
    (``text[:end]`` is the prompt, marker included; ``text[end:]`` the response, leading space included).

    Raises:
        what ``error(field, message)`` builds: the transcript has no assistant turn.
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise error(field, f"HH-RLHF transcript has no {HH_ASSISTANT!r} turn")
    return cut + len(HH_ASSISTANT)


def split_hh_transcript(text: str, field: str, error: ErrorFactory) -> tuple[str, str]:
    """Split an HH-RLHF transcript at its last assistant turn: ``(prompt incl. marker, response)``
    (:func:`hh_prompt_end`).

    Raises:
        what ``error(field, message)`` builds: no assistant turn, or an empty response after the last one.
    """
    cut = hh_prompt_end(text, field, error)
    if cut == len(text):
        raise error(field, f"empty response after the last {HH_ASSISTANT!r}")
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------


def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """The token ids of ``text`` (``tokenizer(text, add_special_tokens=...)["input_ids"]`` as a list)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` has a (non-empty) ``chat_template``."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer, data: str, instead: str) -> None:
    """Refuse conversational data for a tokenizer without a chat template.

    Raises:
        ValueError: ``"the tokenizer has no chat template, but {data}; use a tokenizer with a chat_template or
            {instead}"`` when :func:`has_chat_template` is false.
    """
    if not has_chat_template(tokenizer):
        raise ValueError(f"the tokenizer has no chat template, but {data}; use a tokenizer with a chat_template or "
                         f"{instead}")


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` rendered with the tokenizer's chat template
    (``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``); with ``add_generation_prompt``
    it ends with the template's assistant header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def as_messages(turns: Turns, role: str) -> list[Message]:
    """``turns`` as chat messages: a list unchanged, a non-empty string as one ``role`` message, ``""`` as none."""
    if isinstance(turns, list):
        return turns
    return [{"role": role, "content": turns}] if turns else []


def render_chat_pair(prompt: Turns, chosen: Turns, rejected: Turns, tokenizer) -> tuple[str, str, str]:
    """Render a conversational pair with the chat template: ``(prompt_text, chosen_text, rejected_text)``.

    The prompt (a string becomes one user message) is ``render_chat(prompt, add_generation_prompt=True)``; each
    response (a string becomes one assistant message) is what ``render_chat(prompt + response)`` adds after it. If
    a rendering does not start with the prompt text, the common prefix of the prompt rendered without the
    generation prompt and both full renderings is the prompt text instead.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    require_chat_template(
        tokenizer,
        "the data is conversational (lists of chat messages)",
        "convert the data to a plain-text format such as "
        "{'prompt': str, 'chosen_response': str, 'rejected_response': str}",
    )
    prompt = as_messages(prompt, "user")
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full_texts = [render_chat(tokenizer, prompt + as_messages(response, "assistant")) for response in (chosen, rejected)]
    if not all(full.startswith(prompt_text) for full in full_texts):
        prompt_text = os.path.commonprefix([render_chat(tokenizer, prompt, add_generation_prompt=False), *full_texts])
    chosen_text, rejected_text = (full[len(prompt_text) :] for full in full_texts)
    return prompt_text, chosen_text, rejected_text


def tokenize_pair(prompt: Turns, chosen: Turns, rejected: Turns, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Tokenise a prompt and two responses into ``(prompt_ids, chosen_ids, rejected_ids)`` (token ids, unpadded).

    * Conversational (any of the three is a message list; a plain string prompt becomes one user message, a string
      response one assistant message): the texts of :func:`render_chat_pair`, all tokenised with
      ``add_special_tokens=False``; no EOS is appended: the template closes the turn itself.
    * Plain text: ``prompt_ids = tokenizer(prompt)`` with special tokens (e.g. BOS), each response tokenised
      without special tokens followed by ``tokenizer.eos_token_id`` (when it has one).

    Raises:
        ValueError: conversational data with a tokenizer that has no chat template; a prompt that gives no tokens
            (empty prompt and no BOS); a response that gives no tokens (``"chosen response gives no tokens"``).
    """
    if any(isinstance(turns, list) for turns in (prompt, chosen, rejected)):
        texts = render_chat_pair(prompt, chosen, rejected, tokenizer)
        prompt_ids, chosen_ids, rejected_ids = (encode(tokenizer, text, add_special_tokens=False) for text in texts)
        _check_non_empty(chosen_ids, rejected_ids)
    else:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        prompt_ids = encode(tokenizer, prompt, add_special_tokens=True)
        chosen_ids, rejected_ids = (encode(tokenizer, response, add_special_tokens=False) for response in (chosen, rejected))
        _check_non_empty(chosen_ids, rejected_ids)
        chosen_ids, rejected_ids = chosen_ids + eos, rejected_ids + eos
    if not prompt_ids:
        raise ValueError("prompt gives no tokens (empty prompt and the tokenizer adds no BOS token)")
    return prompt_ids, chosen_ids, rejected_ids


def _check_non_empty(chosen_ids: list[int], rejected_ids: list[int]) -> None:
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if not ids:
            raise ValueError(f"{name} response gives no tokens")


def tokenize_prompt_response(prompt: Turns, response: Turns, tokenizer) -> tuple[list[int], list[int]]:
    """Tokenise one (prompt, response) as the preference data does: ``(prompt_ids, response_ids)``.

    ``prompt`` and ``response`` are plain strings or lists of chat messages; the rules (chat template, BOS, EOS)
    are those of :func:`tokenize_pair`, so a reward model, a PPO actor, SFT and DPO see the same tokens for the
    same text.

    Raises:
        ValueError: as :func:`tokenize_pair`.
    """
    prompt_ids, response_ids, _ = tokenize_pair(prompt, response, response, tokenizer)
    return prompt_ids, response_ids

"""LLM-as-a-judge: the judge and meta-judge prompts of the self-rewarding papers, the rendering and cutting of a
judge request, the parsing of its score or verdict, and the constrained-judgement helpers. Pure functions of text and
a tokenizer; the self-rewarding trainer (:mod:`nemo_aligner.algorithms.self_rewarding`) and the held-out evaluation
(:func:`nemo_aligner.recipes.evaluate.judge_scores`) both judge through them.

Sources: Yuan et al. 2024, "Self-Rewarding Language Models" (arXiv 2401.10020), fig. 2 (the additive 5-point
rubric); Wu et al. 2024, "Meta-Rewarding Language Models" (arXiv 2407.19594), fig. 2 (the meta-judge prompt). Score
and verdict regexes follow NeMo-Aligner's ``judge_reward_regex`` / ``meta_judge_reward_regex`` (``{{ reward }}`` is
the value's slot).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

from nemo_aligner.data.chat import encode, has_chat_template, render_chat
from nemo_aligner.data.prompts import tokenize_prompt
from nemo_aligner.utils.config import REWARD_SLOT, ConfigValueError

# ---------------------------------------------------------------------------------------------------------------
# the papers' prompts
# ---------------------------------------------------------------------------------------------------------------
_RUBRIC = """- Add 1 point if the response is relevant and provides some information related to
the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,
addressing the user's question directly and comprehensively, and is well-organized and
helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer."""

#: The judge prompt of Yuan et al. 2024, fig. 2 (additive 5-point rubric); Jinja fields ``prompt``, ``response``.
DEFAULT_JUDGE_PROMPT = f"""Review the user's question and the corresponding response using the additive 5-point
scoring system described below. Points are accumulated based on the satisfaction of each
criterion:
{_RUBRIC}

<prompt>{{{{ prompt }}}}</prompt>
<response>{{{{ response }}}}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as
necessary. To evaluate the response in alignment with this additive scoring model, we'll
systematically attribute points based on the outlined criteria."""

#: The meta-judge prompt of Wu et al. 2024, fig. 2; Jinja fields ``prompt``, ``response``, ``judgement_a``,
#: ``judgement_b``.
DEFAULT_META_JUDGE_PROMPT = f"""Review the user's question and the corresponding response, along with two judgments.
Determine which judgment is more accurate according to the rubric provided below. The
rubric used for the initial judgments is as follows:
{_RUBRIC}

<prompt>{{{{ prompt }}}}</prompt>
<response>{{{{ response }}}}</response>
<judgement A>{{{{ judgement_a }}}}</judgement A>
<judgement B>{{{{ judgement_b }}}}</judgement B>

After examining the original question, response, and both judgments:
- Explain which judgment is more accurate according to the original rubric and why.
Consider factors such as adherence to the rubric, accuracy in evaluating the response, and
consistency in applying the criteria.
- Conclude with a clear statement of which judgment is better using the format: "Winner: [Judgement A | Judgement B]\""""


def judge_prompt_text(prompt: Any, tokenizer, normalise: bool) -> str:
    """The text of a prompt shown to the judge: chat messages rendered with the chat template (``normalise``: as
    ``"User: ...\\n\\nAssistant: ..."``, no model-specific turn tags), plain text as is (``normalise``: HH-RLHF's
    ``Human:`` becomes ``User:`` and the trailing open ``Assistant:`` turn is dropped)."""
    if isinstance(prompt, list):
        if normalise or not has_chat_template(tokenizer):
            return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
        return render_chat(tokenizer, prompt)
    if not normalise:
        return prompt
    text = prompt.strip()
    if text.endswith("Assistant:"):
        text = text[: -len("Assistant:")].rstrip()
    return text.replace("Human:", "User:").strip()


# ---------------------------------------------------------------------------------------------------------------
# judge templates and parsing (pure functions)
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _jinja(template: str):
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(template)


def render_template(template: str, **fields: str) -> str:
    """Render a Jinja judge template with ``fields`` (``prompt``, ``response``; ``judgement_a``, ``judgement_b``).

    Raises:
        ConfigValueError: the template uses a field that is not given (e.g. a typo ``{{ promt }}``).
    """
    import jinja2

    try:
        return _jinja(template).render(**fields)
    except jinja2.UndefinedError as err:
        raise ConfigValueError(f"judge template: {err} (fields: {', '.join(sorted(fields))})") from None


def fit_judge_prompt(template: str, fields: dict[str, str], count_tokens: Callable[[str], int], max_tokens: int,
                     cut_tokens: Callable[[str, int, bool], str], shrink: Sequence[str] = ("prompt", "response"),
                     ) -> tuple[str, bool]:
    """The rendered template, made to fit ``max_tokens`` by cutting the fields in ``shrink`` order: the ``prompt``
    keeps its END (the open question), any other field its START. Each field is cut by exactly the excess
    (re-measured after each cut) until the text fits or the field is empty. Returns ``(text, truncated)``.

    Args:
        count_tokens: ``text -> tokens``; cut_tokens: ``(text, n, keep_end) -> text`` with its first (``keep_end``)
            or last ``n`` tokens removed.

    Raises:
        ValueError: the template alone (every shrinkable field empty) is longer than ``max_tokens``.
    """
    fields = dict(fields)
    text = render_template(template, **fields)
    truncated = False
    for name in shrink:
        excess = count_tokens(text) - max_tokens
        if excess <= 0:
            return text, truncated
        have = count_tokens(fields[name]) if fields[name] else 0
        fields[name] = cut_tokens(fields[name], min(excess, have), name == "prompt") if have > excess else ""
        truncated = True
        text = render_template(template, **fields)
    if count_tokens(text) > max_tokens:
        raise ConfigValueError(f"the judge template alone is {count_tokens(text)} tokens, more than the {max_tokens} "
                               "allowed (model.encoder_seq_length - model.spin.judge_max_length)")
    return text, truncated


def judge_request_ids(text: str, tokenizer: Any) -> list[int]:
    """A judge request's prompt ids: ``text`` as a user turn through the tokenizer's chat template (the plain text
    when it has none)."""
    if has_chat_template(tokenizer):
        return tokenize_prompt([{"role": "user", "content": text}], tokenizer)
    return tokenize_prompt(text, tokenizer)


def fit_judge_request(template: str, fields: dict[str, str], tokenizer: Any, max_tokens: int) -> str:
    """The text of a judge (or meta-judge) request, rendered from ``template`` and cut (:func:`fit_judge_prompt`) so
    that the whole request (:func:`judge_request_ids`, chat-template tokens included) is at most ``max_tokens``
    tokens of ``tokenizer``.

    Raises:
        ConfigValueError: the template alone does not fit.
    """
    overhead = len(judge_request_ids("", tokenizer)) if has_chat_template(tokenizer) else 0

    def count(text: str) -> int:
        return len(encode(tokenizer, text, add_special_tokens=False))

    def cut(text: str, n: int, keep_end: bool) -> str:
        ids = encode(tokenizer, text, add_special_tokens=False)
        return tokenizer.decode(ids[n:] if keep_end else ids[: len(ids) - n])

    text, _ = fit_judge_prompt(template, fields, count, max_tokens - overhead, cut)
    return text


def close_justification(text: str, prefix: str) -> str:
    """A constrained judgement's justification: the generated ``text`` cut before ``prefix`` (e.g. ``"Score:"``,
    the end string it was stopped at), without trailing blanks, and closed by a newline when not empty; the score
    prefix and the verdict follow it."""
    cut = text.find(prefix.strip())
    return (text[:cut] if cut >= 0 else text).rstrip() + ("\n" if text.strip() else "")


def build_reward_regex(template: str, value_pattern: str) -> re.Pattern:
    """Compile a NeMo-Aligner reward regex: ``{{ reward }}`` becomes the capture group ``value_pattern``."""
    return re.compile(REWARD_SLOT.sub(lambda _: f"({value_pattern})", template))


#: What ``{{ reward }}`` matches in the judge regex: an integer or decimal number (with an optional sign).
SCORE_PATTERN = r"-?\d+(?:\.\d+)?"
#: ... and in the meta-judge regex: the winning judgement's letter.
WINNER_PATTERN = r"[AB]"


def parse_score(text: str, regex: re.Pattern, low: float, high: float) -> float | None:
    """The judgement's score: the LAST match of ``regex`` in ``text`` (the conclusion), if it lies in
    ``[low, high]``; None when nothing matches or the score is out of range (the judgement is dropped)."""
    matches = regex.findall(text)
    if not matches:
        return None
    value = float(matches[-1] if isinstance(matches[-1], str) else matches[-1][0])
    return value if low <= value <= high else None


def parse_winner(text: str, regex: re.Pattern) -> str | None:
    """``"A"`` or ``"B"``: the last meta-judge verdict in ``text`` (None: unparseable)."""
    matches = regex.findall(text)
    return matches[-1].upper() if matches else None


def aggregate_scores(scores: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, variance, valid)`` of a response's valid (not None) judgement scores: the population variance
    ``mean((s - mean)^2)``; ``(None, None, 0)`` when none is valid."""
    valid = [float(s) for s in scores if s is not None]
    if not valid:
        return None, None, 0
    mean = sum(valid) / len(valid)
    return mean, sum((s - mean) ** 2 for s in valid) / len(valid), len(valid)


def strip_score(text: str, regex: re.Pattern) -> str:
    """A judgement with every score match removed (what the meta-judge sees: it must not read the verdicts)."""
    return regex.sub("", text).strip()


def _regex_literal(text: str) -> str:
    """``text`` as a regex literal, escaping only the metacharacters (``re.escape`` also escapes spaces, which not
    every structured-output engine reads)."""
    return "".join("\\" + ch if ch in ".^$*+?{}[]\\|()" else ch for ch in text)


def constrained_judgement_regex(prefix: str, choices: Sequence[str], max_chars: int) -> str:
    """The structured-output regex of a constrained judgement from a separate judge (``judge_endpoint``): at most
    ``max_chars`` characters of justification (any text), then ``prefix`` and exactly one of ``choices``; e.g.
    ``[\\s\\S]{0,512}Score: (0|1|2|3|4|5)``. A token holds at least one character, so an answer of
    :func:`constrained_judgement_max_tokens` new tokens always reaches the score."""
    return (rf"[\s\S]{{0,{int(max_chars)}}}" + _regex_literal(prefix)
            + "(" + "|".join(_regex_literal(c) for c in choices) + ")")


def constrained_judgement_max_tokens(prefix: str, choices: Sequence[str], max_chars: int) -> int:
    """New tokens that always fit :func:`constrained_judgement_regex`: one per character at most."""
    return int(max_chars) + len(prefix) + max(len(c) for c in choices)

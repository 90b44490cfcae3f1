"""Held-out evaluation of a policy: greedy responses to a prompt file, scored by a reward model, with their KL to a
reference policy, their length and their diversity (``examples/nlp/gpt/eval_policy.py`` is the command).

Every online trainer's reference run (``scripts/reference/``) evaluates its initial policy and its export with the
same settings, so "before" and "after" differ only in the weights:

1. The first ``num_prompts`` prompts of the file, rendered and tokenised as the trainers do
   (:func:`~nemo_aligner.data.prompts.tokenize_prompt`), keeping the last ``max_prompt_tokens`` tokens.
2. One greedy response each, at most ``max_new_tokens`` tokens, ending at the tokenizer's EOS or an end string
   (the native engine, or vLLM with ``engine="vllm"``; both give the same tokens up to floating-point ties).
3. The reward model's reward of ``prompt + response`` (standardised as its export says), the response closed as PPO
   closes a rollout for scoring (:func:`~nemo_aligner.data.prompts.scored_response_ids`).
4. :func:`response_kl` to the reference policy, :func:`distinct_n` and the response lengths.
5. With ``judge``: the LLM-as-a-judge score of each response (:func:`judge_scores`), the self-rewarding trainer's
   judge (Yuan et al. 2024, fig. 2 rubric, 0-5 points) written greedily: the number self-rewarding optimises.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_aligner.algorithms.llm_judge import (
    DEFAULT_JUDGE_PROMPT,
    close_justification,
    fit_judge_request,
    judge_prompt_text,
    judge_request_ids,
)
from nemo_aligner.data.chat import encode
from nemo_aligner.data.prompts import (
    end_of_turn_rule,
    end_string_close,
    load_prompts,
    scored_response_ids,
    tokenize_prompt,
)
from nemo_aligner.generation import LengthParams, SamplingParams, VLLMConfig, VLLMEngine, generate
from nemo_aligner.models.hf_causal_lm import load_tokenizer
from nemo_aligner.models.pretrained import resolve_pretrained
from nemo_aligner.models.reward_model import RewardScorer
from nemo_aligner.utils.fs import atomic_write_text

__all__ = ["distinct_n", "response_kl", "judge_scores", "evaluate_policy"]


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n of a set of responses: the number of different n-grams over the number of n-grams, pooled over all
    responses (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models", Sec. 4.3).
    1.0 = no n-gram repeats; near 0 = the responses repeat the same few tokens (a collapsed policy).

    Args:
        responses: token-id sequences.
        n: the n-gram order (>= 1).

    Returns:
        A ratio in [0, 1]; 0.0 when no response has ``n`` tokens.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def response_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """The KL divergence from the reference policy to the policy along one response, summed over its tokens:
    ``sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t))`` in nats, each term exact over the vocabulary (the quantity that
    PPO's per-token KL penalty estimates with ``log pi(y_t) - log pi_ref(y_t)``; InstructGPT, Ouyang et al. 2022,
    Eq. 2). Unlike that one-sample estimate it is never negative, and it is meaningful for greedy responses.

    Args:
        policy_logits: ``[T, V]`` logits of the policy at the positions that predict the ``T`` response tokens.
        reference_logits: ``[T, V]`` the reference policy's logits at the same positions.

    Returns:
        A 0-dim float64 tensor, nats (0 for ``T = 0``).

    Raises:
        ValueError: the shapes differ.
    """
    if policy_logits.shape != reference_logits.shape:
        raise ValueError(f"policy logits {tuple(policy_logits.shape)} and reference logits "
                         f"{tuple(reference_logits.shape)} differ")
    logp = policy_logits.double().log_softmax(-1)
    logq = reference_logits.double().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum()


def _response_logits(lm, prompt: list[int], response: list[int]) -> torch.Tensor:
    """``[len(response), V]`` logits of ``lm`` at the positions predicting each response token."""
    device = next(lm.parameters()).device
    ids = torch.tensor([list(prompt) + list(response)], device=device)
    logits = lm(input_ids=ids).logits[0]
    return logits[len(prompt) - 1: len(prompt) + len(response) - 1].float().cpu()


def judge_scores(engine: VLLMEngine, tokenizer, prompt_texts: Sequence[str], response_texts: Sequence[str],
                 max_justification_tokens: int = 128, max_request_tokens: int = 888,
                 template: str = DEFAULT_JUDGE_PROMPT, score_prefix: str = "Score: ", low: int = 0, high: int = 5,
                 eos_token_ids: Sequence[int] | None = None) -> tuple[list[float], list[str]]:
    """The LLM-as-a-judge score of each response, as the self-rewarding trainer's constrained judge writes it
    (:meth:`~nemo_aligner.algorithms.self_rewarding.SelfRewardingTrainer.constrained_judgements`), greedily:

    1. the request: ``template`` (default: the additive 5-point rubric of Yuan et al. 2024, "Self-Rewarding Language
       Models", fig. 2) with ``{{ prompt }}`` and ``{{ response }}``, as a user turn of the judge's chat template,
       cut to ``max_request_tokens`` (:func:`~nemo_aligner.algorithms.llm_judge.fit_judge_request`: the prompt
       keeps its end, then the response its start);
    2. a greedy justification of at most ``max_justification_tokens`` tokens, stopped at ``score_prefix``;
    3. ``score_prefix`` and the most likely of the scores ``low..high`` after it (vLLM structured outputs, greedy).

    ``engine`` holds the judge's weights (the policy judging itself, as in the paper, or another model refit into
    it); ``eos_token_ids`` also end a justification (default: the tokenizer's EOS). Returns ``(scores, judgement
    texts)``, one each per response, in points (``low..high``).

    Raises:
        ValueError: ``prompt_texts`` and ``response_texts`` differ in length.
    """
    if len(prompt_texts) != len(response_texts):
        raise ValueError(f"{len(prompt_texts)} prompts for {len(response_texts)} responses")
    requests = [judge_request_ids(fit_judge_request(template, {"prompt": p, "response": r}, tokenizer,
                                                    max_request_tokens), tokenizer)
                for p, r in zip(prompt_texts, response_texts)]
    eos = list(eos_token_ids) if eos_token_ids else [int(tokenizer.eos_token_id)]
    out = engine.generate(requests, SamplingParams(use_greedy=True, end_strings=[score_prefix.strip()]),
                          LengthParams(max_length=max_justification_tokens), eos)
    justifications = [close_justification(tokenizer.decode(ids, skip_special_tokens=True), score_prefix)
                      for ids in out.response_ids]
    contexts = [req + encode(tokenizer, just + score_prefix, add_special_tokens=False)
                for req, just in zip(requests, justifications)]
    choices = [str(s) for s in range(int(low), int(high) + 1)]
    picks = engine.generate_choices(contexts, choices, SamplingParams(use_greedy=True), [0] * len(contexts))
    return ([float(choices[k]) for k in picks],
            [just + score_prefix + choices[k] for just, k in zip(justifications, picks)])


def _strip_end_strings(text: str, end_strings: Sequence[str]) -> str:
    """``text`` without a trailing end string (what the judge reads of a response stopped at one)."""
    for end in end_strings:
        if end and text.endswith(end):
            return text[: -len(end)]
    return text


def _load_lm(path: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_pretrained(path), dtype=torch.float32).to(device).eval()


@torch.no_grad()
def evaluate_policy(policy: str, prompt_file: str | Sequence[str], reward_model: str, reference: str | None = None,
                    num_prompts: int = 200, max_new_tokens: int = 128, max_prompt_tokens: int = 384,
                    batch_size: int = 16, engine: str = "native", device: str = "cpu",
                    samples_file: str | None = None, end_strings: Sequence[str] = (), judge: str | None = None,
                    judge_max_tokens: int = 128, judge_template: str | None = None,
                    judge_max_request_tokens: int = 888) -> dict[str, Any]:
    """Greedy responses of ``policy`` to the first ``num_prompts`` prompts of ``prompt_file``, scored by
    ``reward_model``, with their KL to ``reference`` (see the module docstring for the steps).

    Args:
        policy: a causal-LM directory (a trainer's ``hf_export``), ``.gguf`` file or alias.
        prompt_file: prompt file(s) in any format :func:`~nemo_aligner.data.prompts.load_prompts` reads.
        reward_model: an RM export directory (``train_reward_model.py``'s ``hf_export``).
        reference: the reference policy for the KL (default: none, no KL reported).
        num_prompts: prompts evaluated (the file's first ones).
        max_new_tokens: the longest response (tokens).
        max_prompt_tokens: prompts are cut from the left to this many tokens.
        batch_size: prompts per generation batch.
        engine: ``native`` (the trainers' KV-cache engine) or ``vllm``.
        device: ``cpu`` or ``cuda``.
        samples_file: also write one JSON line per prompt (prompt, response, reward, kl, length and the token ids)
            here.
        end_strings: stop a response at these strings (e.g. ``"\n\nHuman:"`` for HH-RLHF transcripts), as the
            online trainers' ``sampling_params.end_strings``; such a response is scored without the end string,
            closed as reward-model data is (:func:`~nemo_aligner.data.prompts.scored_response_ids`, the scoring of
            PPO and rejection sampling). Its length and KL count the end string's tokens (the policy generated them).
        judge: also score each response with an LLM judge (:func:`judge_scores`, justifications of at most
            ``judge_max_tokens`` tokens): ``"self"`` (the policy judges its own responses, as self-rewarding does)
            or a causal-LM directory of the policy's architecture and tokenizer (refit into the same vLLM engine).
            Needs ``engine="vllm"``. The judge sees the prompt's text and the response's text without its end
            string, in ``judge_template`` (a Jinja template with ``{{ prompt }}`` and ``{{ response }}``, as
            ``model.spin.llm_judge_prompt``; None: the paper's rubric) cut to ``judge_max_request_tokens`` tokens.

    Returns:
        ``reward_mean``, ``reward_std`` (standardised RM units), ``kl_mean``, ``kl_max`` (nats per response, with a
        reference), ``length_mean`` (tokens), ``ended_fraction`` (responses that ended with EOS), ``distinct_1``,
        ``distinct_2``, ``num_prompts``, ``seconds``, and the arguments; with a judge also ``judge_score_mean``,
        ``judge_score_std`` (points, ``0..5``).

    Raises:
        MissingFileError: a missing model, reward model or prompt file.
        ValueError: ``engine`` is not native or vllm, the file has no prompts, or a judge without ``engine="vllm"``.
    """
    if engine not in ("native", "vllm"):
        raise ValueError(f"engine={engine!r}: use native or vllm")
    if judge is not None and engine != "vllm":
        raise ValueError("a judge (--judge) needs engine='vllm' (--engine vllm): its scores are vLLM structured outputs")
    start = time.perf_counter()
    source = resolve_pretrained(policy)
    tokenizer = load_tokenizer(source)
    examples = load_prompts(prompt_file, num_prompts)
    if not examples:
        raise ValueError(f"no prompts in {prompt_file}")
    prompts = [tokenize_prompt(e.prompt, tokenizer)[-max_prompt_tokens:] for e in examples]
    lm = _load_lm(policy, device)
    extra = lm.generation_config.eos_token_id
    eos = sorted({int(tokenizer.eos_token_id), *([extra] if isinstance(extra, int) else (extra or []))})
    greedy = SamplingParams(use_greedy=True, end_strings=list(end_strings))
    lengths = LengthParams(max_length=max_new_tokens)
    responses, ended = [], []
    if engine == "vllm":
        # the process's shared engine (one per architecture and settings), given these weights by a refit
        vllm = VLLMEngine.shared(source, VLLMConfig(enable=True, enforce_eager=True, max_num_seqs=64), dtype="float32")
        vllm.refit(lm.state_dict().items())
        out = vllm.generate(prompts, greedy, lengths, eos)
        responses, ended = out.response_ids, out.ended
    else:
        for k in range(0, len(prompts), batch_size):
            out = generate(lm, prompts[k:k + batch_size], greedy, lengths, eos, int(tokenizer.pad_token_id),
                           tokenizer=tokenizer)
            responses += out.response_ids
            ended += out.ended
    judged: tuple[list[float], list[str]] | None = None
    if judge is not None:
        if judge != "self":
            vllm.refit(_load_lm(judge, device).state_dict().items())
        texts = [_strip_end_strings(tokenizer.decode([t for t in r if t not in eos], skip_special_tokens=True),
                                    end_strings) for r in responses]
        judged = judge_scores(vllm, tokenizer, [judge_prompt_text(e.prompt, tokenizer, False) for e in examples],
                              texts, max_justification_tokens=judge_max_tokens,
                              max_request_tokens=judge_max_request_tokens,
                              template=judge_template or DEFAULT_JUDGE_PROMPT, eos_token_ids=eos)
    scorer = RewardScorer.from_pretrained(reward_model, device=device)
    # scored as PPO and rejection sampling score a rollout (end-of-turn suffix, end strings closed like the data)
    end_of_turn = end_of_turn_rule(tokenizer, eos)
    end_string = end_string_close(tokenizer, end_strings)
    scored = [scored_response_ids(p, r, e, end_of_turn, end_string) for p, r, e in zip(prompts, responses, ended)]
    rewards = scorer.score([p + r for p, r in zip(prompts, scored)], micro_batch_size=batch_size)
    kls: list[float] = []
    if reference is not None:
        ref_lm = _load_lm(reference, device)
        for p, r in zip(prompts, responses):
            kls.append(float(response_kl(_response_logits(lm, p, r), _response_logits(ref_lm, p, r))))
    lens = [len(r) for r in responses]
    mean = sum(rewards) / len(rewards)
    summary: dict[str, Any] = {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards)),
        "length_mean": sum(lens) / len(lens),
        "ended_fraction": sum(map(bool, ended)) / len(ended),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
    }
    if kls:
        summary.update(kl_mean=sum(kls) / len(kls), kl_max=max(kls))
    if judged is not None:
        jm = sum(judged[0]) / len(judged[0])
        summary.update(judge_score_mean=jm,
                       judge_score_std=math.sqrt(sum((x - jm) ** 2 for x in judged[0]) / len(judged[0])))
    summary.update(num_prompts=len(prompts), seconds=time.perf_counter() - start, policy=str(policy),
                   reference=None if reference is None else str(reference), reward_model=str(reward_model),
                   prompt_file=[str(p) for p in ([prompt_file] if isinstance(prompt_file, (str, Path)) else prompt_file)],
                   max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, engine=engine,
                   end_strings=list(end_strings), judge=judge,
                   judge_max_tokens=judge_max_tokens if judge is not None else None)
    if samples_file:
        rows = [{"prompt": tokenizer.decode(p), "response": tokenizer.decode(r), "reward": w, "length": len(r),
                 **({"kl": kls[i]} if kls else {}),
                 **({"judge_score": judged[0][i], "judgement": judged[1][i]} if judged else {}),
                 "prompt_ids": p, "response_ids": r}
                for i, (p, r, w) in enumerate(zip(prompts, responses, rewards))]
        atomic_write_text(samples_file, "".join(json.dumps(row) + "\n" for row in rows))
    return summary
